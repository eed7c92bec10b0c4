"""`slimlm train --data FILE --output DIR [...]`: LoRA / QLoRA / full fine-tuning."""

from __future__ import annotations

import argparse

from slimlm.errors import SlimlmError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimlm.train.config import METHODS, OPTIMIZERS, PRECISIONS, SCHEDULES, STRATEGIES

    io = p.add_argument_group("data and output")
    io.add_argument(
        "--data",
        nargs="+",
        required=True,
        help=".jsonl/.json conversations (XTuner or OpenAI style) or text files",
    )
    io.add_argument(
        "--eval-data",
        nargs="+",
        default=[],
        help="held-out files (default: hold out --eval-fraction of --data)",
    )
    io.add_argument(
        "--eval-fraction", type=float, default=0.05, help="share of --data held out for eval (default 0.05)"
    )
    io.add_argument(
        "--output", "-o", required=True, help="output directory (must be empty unless --overwrite / --resume)"
    )
    io.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    io.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output, or from the given checkpoint directory",
    )
    m = p.add_argument_group("model and method")
    m.add_argument(
        "--model",
        "-m",
        default=None,
        help="HF directory, .gguf file, or alias (default: the embedded smollm2-135m)",
    )
    m.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    m.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    m.add_argument(
        "--method", choices=METHODS, default="lora", help="lora (default), qlora (4-bit base) or full"
    )
    m.add_argument("--lora-rank", type=int, default=16)
    m.add_argument("--lora-alpha", type=float, default=32.0)
    m.add_argument("--lora-dropout", type=float, default=0.05)
    m.add_argument(
        "--lora-targets",
        type=_csv,
        default=None,
        help="comma-separated module names (default: all projections)",
    )
    m.add_argument(
        "--qlora-group-size",
        type=int,
        default=None,
        help="4-bit group size: 32, 64 or 128 (default: the largest that fits)",
    )
    o = p.add_argument_group("optimization")
    o.add_argument(
        "--optim",
        choices=OPTIMIZERS,
        default="adamw",
        help="AdamW with 32-bit, 8-bit, 4-bit or 4-bit factored states",
    )
    o.add_argument("--lr", type=float, default=2e-4)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    o.add_argument("--warmup-steps", type=int, default=None)
    o.add_argument("--warmup-ratio", type=float, default=0.03)
    o.add_argument("--min-lr-ratio", type=float, default=0.0)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    o.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch and process")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--max-seq-len", type=int, default=512)
    o.add_argument(
        "--batching",
        choices=("bucket", "pack"),
        default="bucket",
        help="length bucketing (default) or packing",
    )
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    o.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16-mixed on GPUs with bf16, fp32 on CPU",
    )
    o.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute layer activations in the backward"
    )
    o.add_argument("--seed", type=int, default=0)
    o.add_argument(
        "--distributed", choices=STRATEGIES, default="auto", help="under torchrun: ddp (auto) or fsdp"
    )
    o.add_argument(
        "--offload-optimizer",
        action="store_true",
        help="keep optimizer states in CPU memory when training on a GPU (FSDP: CPUOffloadPolicy)",
    )
    r = p.add_argument_group("evaluation, checkpoints, display")
    r.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every N steps (always before and after)"
    )
    r.add_argument(
        "--save-every", type=int, default=None, help="checkpoint every N steps (always after the last)"
    )
    r.add_argument("--keep-checkpoints", type=int, default=2)
    r.add_argument("--log-every", type=int, default=1)
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or reports")
    r.add_argument(
        "--no-memory-tracking",
        action="store_true",
        help="skip the exact tensor-memory measurement of the first steps",
    )


def config_from_args(args: argparse.Namespace):
    from slimlm.train.config import TrainConfig
    from slimlm.train.lora import DEFAULT_TARGETS

    return TrainConfig(
        data=args.data, output_dir=args.output, model=args.model, eval_data=args.eval_data,
        eval_fraction=args.eval_fraction, method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=args.lora_targets or DEFAULT_TARGETS,
        qlora_group_size=args.qlora_group_size, optim=args.optim, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, schedule=args.schedule,
        min_lr_ratio=args.min_lr_ratio, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len, epochs=args.epochs, max_steps=args.max_steps, batching=args.batching,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, seed=args.seed, device=args.device,
        distributed=args.distributed, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
        measure_memory=not args.no_memory_tracking, offload_optimizer=args.offload_optimizer,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validate flags before loading anything
    if args.threads is not None:
        if args.threads <= 0:
            raise SlimlmError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from slimlm.train.trainer import train

    result = train(cfg)
    if not args.quiet and result.rank == 0:
        evals = result.evals
        if len(evals) >= 2:
            print(f"eval loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f} "
                  f"(perplexity {evals[0]['eval_perplexity']:.2f} -> {evals[-1]['eval_perplexity']:.2f})")  # fmt: skip
        kind = "adapter (PEFT format)" if cfg.method != "full" else "model"
        print(f"saved the {kind} to {result.output_dir}")
    return 0
