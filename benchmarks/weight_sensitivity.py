"""Which decoder tensors are sensitive to bigger 4-bit groups (issue 19, mixed precision per tensor).

    python benchmarks/weight_sensitivity.py [--tokens 1024]

On the calibration text only ("tune", the pydoc slice disjoint from the evaluation slice; GPL-3 is
never used here): start from 4-bit RTN with float zeros at group 32 for every decoder linear and an
8-bit embedding table, then give one kind of linear (q, k, v, o, gate, up, down in every layer) group
64 instead, and record the mean KL from the float model and the bits that saves. Kinds whose KL rises
most per bit saved are the ones to keep at group 32 within a bit budget. Writes
benchmarks/results/weight_sensitivity.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks.weight_fidelity import evaluate, parameter_count
from slimlm.eval.fidelity import log_probs
from slimlm.eval.perplexity import scored_windows
from slimlm.eval.texts import named_text
from slimlm.loading import load
from slimlm.quant.quantize import quantize_model, quantized_weight_bytes

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/weight_sensitivity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(None, dtype="bfloat16", progress=False)
    base, tok = loaded.model, loaded.tokenizer
    texts = {"tune": tok.encode(named_text("tune"), add_special_tokens=False)[: args.tokens + 1]}
    with torch.inference_mode():
        refs = {
            "tune": torch.cat(
                [log_probs(lg).half() for lg, _ in scored_windows(base, texts["tune"], 512, progress=False)]
            )
        }
    n_params = parameter_count(base)
    rows = {}
    for kind in (None, *KINDS):
        model = copy.deepcopy(base)
        sizes = {kind: 64} if kind else {}
        quantize_model(
            model, "rtn", 4, 32, progress=False, embedding_bits=8, float_zero=True, group_sizes=sizes
        )
        row = evaluate(model, texts, refs, 512)["tune"]
        row["bits_per_weight"] = 8 * quantized_weight_bytes(model) / n_params
        rows[kind or "all-g32"] = row
        print(
            f"{kind or 'all-g32':18s} {row['bits_per_weight']:.3f} bpw  dppl {row['delta_ppl_pct']:+.2f}%  KL {row['kl_mean']:.4f}",
            flush=True,
        )
    base_row = rows["all-g32"]
    for kind in KINDS:
        r = rows[kind]
        saved = base_row["bits_per_weight"] - r["bits_per_weight"]
        r["kl_per_bpw_saved"] = (r["kl_mean"] - base_row["kl_mean"]) / saved
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "text": "tune", "rows": rows}, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
