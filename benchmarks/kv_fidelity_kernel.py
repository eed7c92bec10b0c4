"""KV formats' fidelity on the path users decode on: the C decode kernel over the engine's own pools.

    python benchmarks/kv_fidelity_kernel.py [--tokens 2048] [--texts pydoc,gpl3] [--kv-dtypes int8,int4,k8v4]
    python benchmarks/kv_fidelity_kernel.py --decode-speed    # batch-1 decode tok/s per format (run alone)

The embedded SmolLM2-135M-Instruct in bf16, laid out for the kernel, decodes every window token by
token (teacher-forced: position p reads the text's token p and predicts p + 1), all windows of all texts
side by side in one batch, over a pool of each `--kv-dtype` and over a bf16 pool, the reference. Every
token, the first included, goes through the kernel's decode step, which writes K/V into the pool (for
int4: stages the block in bf16, quantizes it when full) and reads them back as stored; so this measures
exactly what a user's decode reads, where `slimlm eval` and benchmarks/kv_fidelity_sweep.py measure a
whole-window prefill through the PyTorch pool (the same rule, float32 or bf16 arithmetic).

Windows: the first `--tokens` + 1 tokens of each text in non-overlapping windows of `--context`, as
benchmarks/weight_fidelity.py and kv_fidelity_sweep.py take them. Metrics against the bf16 pool: Δppl,
mean / p99 KL(reference || variant), top-1 agreement; bytes per token (all layers, K and V, the
planner's figure). `--decode-speed` adds `slimlm.eval.compare.decode_rate` (median batch-1 greedy
tok/s, 64-token prompt, 64 new tokens, as `slimlm eval compare` reports it). Merges into --out
(default benchmarks/results/kv_fidelity_kernel.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slimlm.eval.fidelity import FidelityStats, log_probs, summary_line
from slimlm.eval.texts import named_text
from slimlm.kernels.fused_decode import FusedDecoder
from slimlm.kv import make_kv_cache
from slimlm.loading import load
from slimlm.models.prepack import prepare_linears
from slimlm.plan.inference import kv_bytes_per_token

BLOCK = 16


def windows_of(loaded, texts: list[str], tokens: int, context: int) -> list[tuple[str, list[int]]]:
    out = []
    for text in texts:
        ids = loaded.tokenizer.encode(named_text(text), add_special_tokens=False)[: tokens + 1]
        out += [(text, ids[w : w + context + 1]) for w in range(0, len(ids) - context, context)]
    return out


def decoder_for(model, kv_dtype: str, n_windows: int, context: int):
    per_window = -(-context // BLOCK)
    cache = make_kv_cache(
        model.config, n_windows * per_window, BLOCK, kv_dtype, torch.bfloat16, "cpu", max_seqs=n_windows
    )
    cache.prepare_blocks(range(n_windows * per_window))
    decoder, why = FusedDecoder.create(model, cache, max_ctx=context, max_batch=n_windows)
    if decoder is None:
        raise SystemExit(f"the C decode kernel cannot run here: {why}")
    tables = [list(range(w * per_window, (w + 1) * per_window)) for w in range(n_windows)]
    return decoder, tables


@torch.inference_mode()
def fidelity(loaded, kv_dtypes: list[str], windows, context: int) -> dict:
    model = loaded.model
    texts = sorted({t for t, _ in windows})
    ref, ref_tables = decoder_for(model, "bf16", len(windows), context)
    variants = {d: decoder_for(model, d, len(windows), context) for d in kv_dtypes}
    stats = {d: {t: FidelityStats() for t in texts} for d in kv_dtypes}
    start = time.perf_counter()
    for p in range(context):
        toks = [ids[p] for _, ids in windows]
        targets = torch.tensor([ids[p + 1] for _, ids in windows])
        ref_lp = log_probs(ref.decode(toks, [p] * len(windows), ref_tables))
        for d, (decoder, tables) in variants.items():
            logits = decoder.decode(toks, [p] * len(windows), tables)
            for t in texts:
                rows = torch.tensor([i for i, (name, _) in enumerate(windows) if name == t])
                stats[d][t].add_logprobs(ref_lp[rows], logits[rows], targets[rows])
        if p % 64 == 63:
            print(f"  position {p + 1}/{context}: {time.perf_counter() - start:.0f} s", flush=True)
    return {d: {t: s.summary() for t, s in per.items()} for d, per in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--texts", default="pydoc,gpl3")
    ap.add_argument("--kv-dtypes", default="int8,int4,k8v4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-speed", action="store_true", help="measure decode tok/s instead")
    ap.add_argument("--out", default="benchmarks/results/kv_fidelity_kernel.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.is_file() else {}
    kv_dtypes = args.kv_dtypes.split(",")
    loaded = load(None, dtype="bfloat16", progress=False)
    if args.decode_speed:
        from slimlm.eval.compare import decode_rate

        speed = saved.setdefault("decode_tok_s", {})
        for d in ["bf16", *kv_dtypes]:
            speed[d] = decode_rate(loaded, kv_dtype=d, runs=5)
            print(f"{d:6s} {speed[d]:.1f} tok/s", flush=True)
        saved["decode_speed_threads"] = args.threads
    else:
        if saved and (saved.get("tokens_per_text"), saved.get("context")) != (args.tokens, args.context):
            raise SystemExit(f"{out_path} holds another window setting; use another --out")
        saved.update(tokens_per_text=args.tokens, context=args.context, reference="bf16 pool, C kernel")
        prepare_linears(loaded.model, "plain")
        windows = windows_of(loaded, args.texts.split(","), args.tokens, args.context)
        results = fidelity(loaded, kv_dtypes, windows, args.context)
        for d, per in results.items():
            row = saved.setdefault("results", {}).setdefault(d, {})
            row["bytes_per_token"] = kv_bytes_per_token(loaded.config, d, BLOCK)
            row.update(per)
            for t, r in per.items():
                print(f"{t:6s} {d:6s} {summary_line(r)}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
