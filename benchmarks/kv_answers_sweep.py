"""How many of the 20 answers of tests/test_kv_answers.py each int4 KV layout keeps (issue 19), emulated.

    python benchmarks/kv_answers_sweep.py [--variants a,b,...] [--engine int4,int8]

The float32 model answers the 20 questions greedily (12 tokens, first sentence compared, as the test
does) with K/V quantized and read as a layout of benchmarks/kv_fidelity_sweep.py says (`SimAttention`,
with the exact reads rounded to bf16 as the pool's staging stores them); each step runs the dense
forward over the whole sequence, which gives every token the inputs the pool's position rule gives it.
Reference: the same model with float K/V. `--engine` also runs the engine's real pools (float32 model)
for those `--kv-dtype`s, to check that the emulation matches them. Results: benchmarks/results/
kv_answers_sweep.json (or --out), per variant the answers kept and the ones that changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.kv_fidelity_sweep import VARIANTS, SimAttention, window_logits
from slimlm.loading import load
from tests.test_kv_answers import GREEDY, QUESTIONS, _answers, _first_sentence


@torch.inference_mode()
def emulated_answers(loaded, scheme) -> list[str]:
    tok, model, config = loaded.tokenizer, loaded.model, loaded.config
    attention = SimAttention(config, scheme)
    eos = set(config.eos_token_ids) if getattr(config, "eos_token_ids", None) else {tok.eos_token_id}
    answers = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = tok.encode(text)
        new: list[int] = []
        for _ in range(GREEDY.max_tokens):
            nxt = int(window_logits(model, torch.tensor(ids + new), attention)[-1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
        answers.append(_first_sentence(tok.decode(new, skip_special_tokens=True)))
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="int4-kivi-res-rot")
    ap.add_argument("--engine", default="", help="also run the engine's pools of these --kv-dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/kv_answers_sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(None, dtype="float32", progress=False)
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.is_file() else {}
    ref = emulated_answers(loaded, None)
    saved["reference"] = ref
    runs = [(n, lambda n=n: emulated_answers(loaded, dataclasses.replace(VARIANTS[n], stage_bf16=True)))
            for n in args.variants.split(",") if n]  # fmt: skip
    if args.engine:
        engine_ref = _answers(loaded, "fp32")
        saved["engine_reference_matches"] = engine_ref == ref
        print(f"engine fp32 pool == emulated float reference: {engine_ref == ref}")
        runs += [(f"engine:{d}", lambda d=d: _answers(loaded, d)) for d in args.engine.split(",")]
    for name, run in runs:
        start = time.perf_counter()
        answers = run()
        changed = [{"question": q, "reference": a, "variant": b}
                   for q, a, b in zip(QUESTIONS, ref, answers, strict=True) if a != b]  # fmt: skip
        saved.setdefault("results", {})[name] = {"kept": len(QUESTIONS) - len(changed), "changed": changed}
        print(f"{name:34s} kept {len(QUESTIONS) - len(changed)}/20 ({time.perf_counter() - start:.0f} s)")
        for c in changed:
            print(f"    {c['question']!r}: {c['reference']!r} -> {c['variant']!r}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(saved, indent=2))


if __name__ == "__main__":
    main()
