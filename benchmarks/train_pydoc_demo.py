"""Fine-tune SmolLM2-135M-Instruct with LoRA on pydoc conversations; held-out loss and before/after samples.

    python benchmarks/train_pydoc_demo.py --threads 2 --epochs 3    # run it in the background: minutes on 2 cores

Data: "Explain the Python topic 'X'." -> the first paragraph of CPython's pydoc topic X (see
pydoc_chat_data.py); 10 of the 79 topics are held out. Writes benchmarks/results/train_pydoc_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pydoc_chat_data import write_split  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def sample(model, tokenizer, question: str, max_tokens: int) -> str:
    from slimlm.generation import generate_tokens

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    model.eval()
    out = list(generate_tokens(model, ids, max_tokens, eos_token_ids=tokenizer.eos_token_ids))
    return tokenizer.decode(out).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--optim", default="adamw4bit")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16-mixed")
    p.add_argument("--eval-every", type=int, default=9)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (a smoke test)")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--sample-tokens", type=int, default=60)
    p.add_argument("--work-dir", default="/tmp/slimlm_train_demo")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from slimlm.loading import load
    from slimlm.train.config import TrainConfig
    from slimlm.train.trainer import train

    work = Path(args.work_dir)
    train_file, eval_file, held = write_split(work / "data")
    loaded = load(None, dtype="float32", progress=False)
    tok = loaded.tokenizer
    questions = [r["conversation"][0]["input"] for r in held[: args.samples]]
    references = [r["conversation"][0]["output"] for r in held[: args.samples]]
    start = time.perf_counter()
    before = [sample(loaded.model, tok, q, args.sample_tokens) for q in questions]
    sample_seconds = time.perf_counter() - start

    cfg = TrainConfig(data=[str(train_file)], eval_data=[str(eval_file)], output_dir=str(work / "run"),
                      overwrite=True, method="lora", lora_rank=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                      optim=args.optim, precision=args.precision, lr=args.lr, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                      epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every, warmup_ratio=0.05, progress=True, log_every=3)  # fmt: skip
    start = time.perf_counter()
    result = train(cfg, loaded)
    train_seconds = time.perf_counter() - start
    after = [sample(loaded.model, tok, q, args.sample_tokens) for q in questions]  # LoRA was added in place

    evals = result.evals
    report = {
        "command": "python benchmarks/train_pydoc_demo.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "settings": {k: v for k, v in vars(args).items() if k != "work_dir"},
        "train_examples": len(train_file.read_text().splitlines()),
        "eval_examples": len(held),
        "steps": result.state.step,
        "train_seconds": round(train_seconds, 1),
        "tokens_seen": result.state.tokens_seen,
        "evals": evals,
        "eval_loss_before": evals[0]["eval_loss"],
        "eval_loss_after": evals[-1]["eval_loss"],
        "train_loss_first_last": [result.losses[0], result.losses[-1]],
        "memory": {
            "measured_tensor_peak_bytes": result.measured_peak_bytes,
            "peak_rss_bytes": result.peak_rss_bytes,
            "planned_peak_bytes": result.planned_peak_bytes,
        },  # fmt: skip
        "samples": [
            {"question": q, "reference": r, "before": b, "after": a}
            for q, r, b, a in zip(questions, references, before, after, strict=True)
        ],  # fmt: skip
        "sample_seconds_before": round(sample_seconds, 1),
        "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_pydoc_demo.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# LoRA on pydoc conversations (SmolLM2-135M-Instruct)", "", f"Command: `{report['command']}`", "",
        f"{report['train_examples']} train / {report['eval_examples']} held-out conversations, {result.state.step} steps, "
        f"{train_seconds:.0f} s on {report['threads']} threads.", "",
        "| step | held-out loss | perplexity |", "|---:|---:|---:|",
        *[f"| {e['step']} | {e['eval_loss']:.4f} | {e['eval_perplexity']:.2f} |" for e in evals], "",
    ]  # fmt: skip
    for s in report["samples"]:
        lines += [f"**{s['question']}** (held out)", "", f"- reference: {s['reference']}", f"- before: {s['before']}",
                  f"- after: {s['after']}", ""]  # fmt: skip
    (RESULTS / "train_pydoc_demo.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
