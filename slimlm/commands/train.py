"""`slimlm train --data FILE --output DIR [...]`: LoRA / QLoRA / full fine-tuning."""

from __future__ import annotations

import argparse

from slimlm.errors import SlimlmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimlm.settings import add_fields
    from slimlm.train.config import TrainConfig

    add_fields(p.add_argument_group("data and output"), TrainConfig,
               ["data", "eval_data", "eval_fraction", "output_dir", "overwrite", "resume"])  # fmt: skip
    m = p.add_argument_group("model and method")
    add_fields(m, TrainConfig, ["model", "device"])
    m.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    add_fields(
        m,
        TrainConfig,
        ["method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "qlora_group_size"],
    )
    add_fields(p.add_argument_group("optimization"), TrainConfig,
               ["optim", "lr", "weight_decay", "schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio",
                "max_grad_norm", "batch_size", "grad_accum", "max_seq_len", "batching", "epochs", "max_steps",
                "precision", "gradient_checkpointing", "seed", "distributed", "offload_optimizer"])  # fmt: skip
    add_fields(p.add_argument_group("evaluation, checkpoints, display"), TrainConfig,
               ["eval_every", "save_every", "keep_checkpoints", "log_every", "progress", "measure_memory"])  # fmt: skip


def config_from_args(args: argparse.Namespace):
    from slimlm.settings import from_args
    from slimlm.train.config import TrainConfig

    return from_args(TrainConfig, args, max_grad_norm=args.max_grad_norm or None)  # 0 disables clipping


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validate flags before loading anything
    if args.threads is not None:
        if args.threads <= 0:
            raise SlimlmError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from slimlm.train.trainer import train

    result = train(cfg)
    if cfg.progress and result.rank == 0:
        evals = result.evals
        if len(evals) >= 2:
            print(f"eval loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f} "
                  f"(perplexity {evals[0]['eval_perplexity']:.2f} -> {evals[-1]['eval_perplexity']:.2f})")  # fmt: skip
        kind = "adapter (PEFT format)" if cfg.method != "full" else "model"
        print(f"saved the {kind} to {result.output_dir}")
    return 0
