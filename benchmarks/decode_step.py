"""One decode step at batch sizes 1..32: the C decode kernel against the engine's PyTorch path (issue 3).

    python benchmarks/decode_step.py [--threads 2] [--batches 1 2 4 8 16 32] [--context 120]

Every sequence has a `--context`-token prompt in the paged pool; a step adds one token to each, at
the same position every time (the step is repeated, not advanced, so its blocks must already exist:
the context must not end on a block boundary). The
same step (same tokens, positions and block tables) is timed on three runners: the C kernel on plain
weights (what the engine picks on CPUs with AVX512-BF16), PyTorch on plain weights (one-sequence
steps use torch's GEMV) and PyTorch on oneDNN-packed weights (its fastest batched kernel). Medians of
`--repeats`; writes benchmarks/results/decode_step.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimlm.bench.workload import make_prompts
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams

RESULTS = Path(__file__).parent / "results"


def step_ms(runner, seqs, repeats: int) -> float:
    runner.run(seqs, is_prefill=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(seqs, is_prefill=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def prefilled(llm: LLM, prompts: list[list[int]]):
    """Sequences whose prompts are in the pool, ready for a decode step."""
    engine = llm.engine
    seqs = [
        engine.add_request(p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)) for p in prompts
    ]
    while any(s.num_tokens == len(s.prompt_token_ids) for s in seqs):
        engine.step()
    if any(len(s.block_table) * engine.config.block_size < s.num_tokens for s in seqs):
        raise SystemExit("the step's position starts a new block; pick a --context that does not end one")
    return seqs


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--context", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    most = max(args.batches)
    kv_tokens = most * (args.context + 32)

    def build(layout: str, kernel: str) -> LLM:
        return LLM(None, dtype="bfloat16", device="cpu", weights_layout=layout, decode_kernel=kernel,
                   max_num_seqs=most, kv_cache_tokens=kv_tokens, progress=False)  # fmt: skip

    systems = {"C kernel": build("plain", "c"), "PyTorch, plain": build("plain", "torch"),
               "PyTorch, packed": build("packed", "torch")}  # fmt: skip
    prompts = make_prompts(systems["C kernel"].tokenizer, most, args.context)
    rows = {name: {} for name in systems}
    for name, llm in systems.items():
        seqs = prefilled(llm, prompts)
        for b in args.batches:
            rows[name][b] = step_ms(llm.engine.runner, seqs[:b], args.repeats)
            print(
                f"{name:16s} batch {b:3d}: {rows[name][b]:7.2f} ms/step  {1000 * b / rows[name][b]:7.1f} tok/s"
            )
    print(f"\n{'batch':>5s} " + " ".join(f"{n:>16s}" for n in systems) + "   kernel speed-up vs best PyTorch")
    for b in args.batches:
        best = min(rows["PyTorch, plain"][b], rows["PyTorch, packed"][b])
        cells = " ".join(f"{rows[n][b]:13.2f} ms" for n in systems)
        print(f"{b:5d} {cells}   {best / rows['C kernel'][b]:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "decode_step.json"
    out.write_text(
        json.dumps({"threads": args.threads, "context": args.context, "ms_per_step": rows}, indent=2)
    )
    print(f"wrote {out}")
