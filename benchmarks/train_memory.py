"""Training memory on SmolLM2-135M: full fp32 AdamW vs LoRA / QLoRA + 4-bit AdamW + gradient checkpointing.

    python benchmarks/train_memory.py [--seq-len 256 --batch-size 2 --steps 3 --threads 1]

Each configuration runs in a fresh process (so peak RSS is its own) for a few optimizer steps on plain
pydoc text (every token has a label: the logits are as large as they get). Reported per configuration:
- tensor peak: exact live tensor bytes, op by op, over the first two steps (slimlm.plan's
  TensorMemoryTracker, a TorchDispatchMode), i.e. until the optimizer states exist;
- peak RSS of the training phase (VmHWM, reset through /proc/self/clear_refs after the model is ready),
  and RSS when training starts;
- optimizer state bytes (exact) and the planner's predicted peak for the same settings.
Writes benchmarks/results/train_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "full fp32 + AdamW": dict(method="full", optim="adamw", gradient_checkpointing=False),
    "LoRA r16 + AdamW4bit + ckpt": dict(method="lora", optim="adamw4bit", gradient_checkpointing=True),
    "QLoRA r16 + AdamW4bit + ckpt": dict(method="qlora", optim="adamw4bit", gradient_checkpointing=True),
    "LoRA r16 + AdamW (no ckpt)": dict(method="lora", optim="adamw", gradient_checkpointing=False),
    "QLoRA r16 + AdamW (no ckpt)": dict(method="qlora", optim="adamw", gradient_checkpointing=False),
}


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from pydoc_data.topics import topics

    from slimlm.loading import load
    from slimlm.optim import optimizer_state_bytes
    from slimlm.train.config import TrainConfig
    from slimlm.train.trainer import Trainer

    work = Path(args.work_dir) / name.replace(" ", "_").replace("+", "")
    work.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(topics[k] for k in sorted(topics))[: args.chars]
    (work / "pydoc.txt").write_text(text)
    loaded = load(None, dtype="float32", progress=False)
    cfg = TrainConfig(data=[str(work / "pydoc.txt")], output_dir=str(work / "run"), overwrite=True, eval_fraction=0.0,
                      batch_size=args.batch_size, max_seq_len=args.seq_len, max_steps=args.steps, lora_rank=16,
                      lora_dropout=args.lora_dropout,
                      progress=False, precision="fp32", **CONFIGS[name])  # fmt: skip
    trainer = Trainer(cfg, loaded)
    del loaded
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the training phase only
    rss_start = status_bytes("VmRSS")
    start = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    return {
        "config": name,
        "settings": CONFIGS[name],
        "trainable_parameters": trainer.prepared.trainable_parameters,
        "tensor_peak_bytes": result.measured_peak_bytes,
        "planned_peak_bytes": result.planned_peak_bytes,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "rss_at_start_bytes": rss_start,
        "peak_rss_training_bytes": status_bytes("VmHWM"),
        "seconds_per_step": round(seconds / args.steps, 2),
        "final_loss": result.losses[-1],
    }


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-dropout", type=float, default=0.05, help="slimlm train's default")
    p.add_argument("--chars", type=int, default=40_000, help="pydoc characters to train on")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--work-dir", default="/tmp/slimlm_train_memory")
    p.add_argument("--out", default="train_memory", help="results/<out>.json and .md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    command = "python benchmarks/train_memory.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training memory, SmolLM2-135M-Instruct", "",
        f"Command: `{command}` (batch {args.batch_size} x {args.seq_len} tokens, fp32 compute, CPU, "
        f"LoRA dropout {args.lora_dropout})", "",
        "| configuration | trainable params | optimizer states MiB | tensor peak MiB (measured) | planner peak MiB "
        "| peak RSS in training MiB | RSS at start MiB | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['config']} | {r['trainable_parameters']:,} | {mib(r['optimizer_state_bytes'])} | "
                     f"{mib(r['tensor_peak_bytes'])} | {mib(r['planned_peak_bytes'])} | {mib(r['peak_rss_training_bytes'])} | "
                     f"{mib(r['rss_at_start_bytes'])} | {r['seconds_per_step']} |")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
