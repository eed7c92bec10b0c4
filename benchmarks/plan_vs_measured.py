"""Planner vs measurement: predicted training-step peak against the measured tensor-memory peak, SmolLM2-135M.

How it measures: `slimlm.plan.measure.TensorMemoryTracker`, a TorchDispatchMode that records every new
tensor storage produced by any aten op (forward, backward, optimizer step) and releases it when the
storage dies; the peak is the largest sum of live storage bytes (weights, states and inputs included).
The step is the planner's (`slimlm.plan.measure_training`): HF transformers' LlamaForCausalLM loaded
from the embedded GGUF, SDPA attention, loss from labels, zero_grad(set_to_none); the peak of the 2nd
step (optimizer states exist). Mixed precision keeps fp32 master weights in the optimizer.

    python benchmarks/plan_vs_measured.py            # the full matrix (minutes on 2 cores)
    python benchmarks/plan_vs_measured.py --quick    # four cases
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch


def load_smollm2():
    import transformers

    from slimlm.loading import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model


def cases(quick: bool) -> list[dict]:
    out = []
    for method, precision, ckpt in itertools.product(
        ("full", "lora"), ("fp32", "bf16", "mixed"), (False, True)
    ):
        out.append(dict(method=method, precision=precision, gradient_checkpointing=ckpt, optimizer="adamw"))
    for optimizer in ("sgd", "adamw8bit", "adamw4bit", "adamw4bit-factor"):
        out.append(dict(method="full", precision="bf16", gradient_checkpointing=False, optimizer=optimizer))
    out.append(
        dict(
            method="full",
            precision="bf16",
            gradient_checkpointing=False,
            optimizer="adamw",
            flash_attention=False,
        )
    )
    if quick:
        out = [out[0], out[3], out[7], out[12]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--match", nargs="*", default=[], help="only cases whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimlm.plan.devices import Device
    from slimlm.plan.measure_training import measure_training_step
    from slimlm.plan.models import resolve_model
    from slimlm.plan.training import TrainingSettings, plan_training

    config = resolve_model(None).config
    device = Device("cpu", 2**40, 2**40, "cpu")  # no fit check here: only the predicted peak matters
    base = load_smollm2()
    n_hf = sum(p.numel() for p in base.parameters())
    print(f"SmolLM2-135M from GGUF: {n_hf:,} parameters (planner: {config.num_parameters():,}); "
          f"micro-batch {args.micro_batch} x seq {args.seq_len}; torch {torch.__version__}")  # fmt: skip
    print(f"{'case':58s} {'plan MB':>9s} {'meas MB':>9s} {'error':>7s}  peak phase")
    worst = 0.0
    for kw in cases(args.quick):
        name = " ".join(f"{k}={v}" for k, v in kw.items())
        if args.match and not any(m in name for m in args.match):
            continue
        s = TrainingSettings(micro_batch=args.micro_batch, seq_len=args.seq_len, lora_rank=16, **kw)
        plan = plan_training(config, device, s)
        start = time.perf_counter()
        measured = measure_training_step(copy.deepcopy(base), s, config.vocab_size)
        err = plan.total_bytes / measured.peak_bytes - 1
        worst = max(worst, abs(err))
        print(f"{name:58s} {plan.total_bytes / 1e6:9.1f} {measured.peak_bytes / 1e6:9.1f} {err * 100:+6.1f}%  "
              f"{plan.peak_phase} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    print(f"worst |error|: {worst * 100:.1f}%")


if __name__ == "__main__":
    main()
