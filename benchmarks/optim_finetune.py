"""Optimizer benchmark (issue 8): a real CPU fine-tune of SmolLM2-135M with 32-bit AdamW, slimlm's
AdamW8bit / AdamW4bit / AdamWFactor4bit and, where they import, torchao's AdamW8bit / AdamW4bit and
bitsandbytes' AdamW8bit. Every variant starts from the same weights and sees the same batches of text
nobody here wrote (CPython's pydoc topics); the last 10% of that text is held out for perplexity.

    python benchmarks/optim_finetune.py [--steps 24] [--batch 2] [--seq-len 64] [--train-layers 8]

`--train-layers N` trains the last N decoder layers and the final norm (embeddings frozen); 0 trains all
135M parameters. On a shared 2-core machine a full fine-tune step took ~45 s, hence the default.

Peers are optional: `pip install --no-deps torchao bitsandbytes` (both accept torch 2.13), or put them on
PYTHONPATH. Writes benchmarks/results/optim_finetune.json; then run benchmarks/optim_plot.py for the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimlm.loading.default_model import default_model_path
from slimlm.optim import AdamW4bit, AdamW8bit, AdamWFactor4bit, optimizer_state_bytes
from slimlm.optim.qmaps import signed_4bit_map, signed_8bit_map, unsigned_8bit_map, zero_free_linear_map

RESULTS = Path(__file__).parent / "results" / "optim_finetune.json"
Factory = Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]


def peer_variants() -> tuple[dict[str, Factory], dict[str, str], dict[str, bool]]:
    """Optional peers that import on this machine, why the others did not, and their code tables vs ours."""
    found: dict[str, Factory] = {}
    missing: dict[str, str] = {}
    tables: dict[str, bool] = {}
    try:
        import torchao
        from torchao.optim import AdamW4bit as AoAdamW4bit
        from torchao.optim import AdamW8bit as AoAdamW8bit
        from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

        found[f"torchao {torchao.__version__} AdamW8bit"] = lambda ps, lr: AoAdamW8bit(ps, lr=lr)
        found[f"torchao {torchao.__version__} AdamW4bit"] = lambda ps, lr: AoAdamW4bit(ps, lr=lr)
        tables["torchao 4-bit signed == ours"] = torch.equal(
            torch.tensor(get_qmap_signed()), signed_4bit_map()
        )
        tables["torchao 4-bit unsigned == ours"] = torch.equal(
            torch.tensor(get_qmap_unsigned()), zero_free_linear_map()
        )
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        missing["torchao"] = f"{type(exc).__name__}: {exc}"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f

        found[f"bitsandbytes {bnb.__version__} AdamW8bit"] = lambda ps, lr: bnb.optim.AdamW8bit(ps, lr=lr)
        tables["bitsandbytes signed == ours"] = torch.equal(bnb_f.create_dynamic_map(True), signed_8bit_map())
        tables["bitsandbytes unsigned == ours"] = torch.equal(
            bnb_f.create_dynamic_map(False), unsigned_8bit_map()
        )
    except Exception as exc:  # noqa: BLE001
        missing["bitsandbytes"] = f"{type(exc).__name__}: {exc}"
    return found, missing, tables


def load_model_and_tokens(seq_len: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """SmolLM2-135M (float32, via transformers' GGUF loader) and the corpus as train / eval chunks."""
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    chunks = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)  # [chunks, seq_len]
    split = int(chunks.shape[0] * 0.9)
    return model, chunks[:split], chunks[split:]


@torch.no_grad()
def eval_loss(model: torch.nn.Module, chunks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, chunks.shape[0], batch):
        x = chunks[i : i + batch]
        total += model(input_ids=x, labels=x).loss.item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


def train(
    name: str, factory: Factory, model: torch.nn.Module, initial: dict, data: dict, args: argparse.Namespace
) -> dict:
    model.load_state_dict(initial)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = factory(params, args.lr)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    losses, fwd_bwd, opt_wall, opt_cpu = [], [], [], []
    started = time.perf_counter()
    state_bytes = None
    for step in range(args.steps):
        x = data["train"][data["order"][step * args.batch : (step + 1) * args.batch]]
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        fwd_bwd.append(time.perf_counter() - start)
        wall, cpu = time.perf_counter(), time.process_time()
        opt.step()
        opt_wall.append(time.perf_counter() - wall)
        opt_cpu.append(time.process_time() - cpu)
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if state_bytes is None:
            state_bytes = optimizer_state_bytes(opt)
        print(f"{name:32s} step {step + 1:3d} loss {losses[-1]:.4f} opt {opt_wall[-1]:.2f}s", flush=True)
    final_eval = eval_loss(model, data["eval"], args.batch)
    print(f"{name}: eval loss {final_eval:.4f} after {time.perf_counter() - started:.0f}s", flush=True)
    del opt
    return {
        "losses": losses,
        "final_train_loss_last5": statistics.mean(losses[-5:]),
        "eval_loss": final_eval,
        "eval_perplexity": math.exp(final_eval),
        "optimizer_state_bytes": state_bytes,
        "first_step_s": opt_wall[0],
        "median_opt_step_s": statistics.median(opt_wall[1:]),
        "median_opt_step_cpu_s": statistics.median(opt_cpu[1:]),
        "median_fwd_bwd_s": statistics.median(fwd_bwd),
    }


def interleaved_step_times(
    model: torch.nn.Module, variants: dict[str, Factory], x: torch.Tensor, rounds: int
) -> dict:
    """Optimizer step alone on one set of full-model gradients, variants interleaved round by round
    (the machine is shared and noisy); medians of wall and CPU seconds."""
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {name: factory(params, 1e-7) for name, factory in variants.items()}
    for opt in opts.values():
        opt.step()  # state allocation, and torchao's compilation, outside the timing
    wall: dict[str, list[float]] = {name: [] for name in opts}
    cpu: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            w, c = time.perf_counter(), time.process_time()
            opt.step()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    base_wall, base_cpu = (
        statistics.median(wall["torch AdamW (fp32)"]),
        statistics.median(cpu["torch AdamW (fp32)"]),
    )
    return {
        name: {
            "median_wall_s": statistics.median(wall[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "wall_vs_torch": statistics.median(wall[name]) / base_wall,
            "cpu_vs_torch": statistics.median(cpu[name]) / base_cpu,
        }
        for name in opts
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--train-layers", type=int, default=8, help="train the last N decoder layers; 0: all")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=12, help="held-out chunks scored for perplexity")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    variants: dict[str, Factory] = {
        "torch AdamW (fp32)": lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
        "slimlm AdamW8bit": lambda ps, lr: AdamW8bit(ps, lr=lr),
        "slimlm AdamW4bit": lambda ps, lr: AdamW4bit(ps, lr=lr),
        "slimlm AdamWFactor4bit": lambda ps, lr: AdamWFactor4bit(ps, lr=lr),
    }
    peers, missing, tables = peer_variants()
    variants.update(peers)
    if args.only:
        keep = args.only.split(",")
        variants = {
            k: v for k, v in variants.items() if k == "torch AdamW (fp32)" or any(s in k for s in keep)
        }

    model, train_chunks, eval_chunks = load_model_and_tokens(args.seq_len)
    if args.train_layers:
        model.requires_grad_(False)
        model.model.layers[-args.train_layers :].requires_grad_(True)
        model.model.norm.requires_grad_(True)
    order = torch.randperm(train_chunks.shape[0], generator=torch.Generator().manual_seed(0))
    if args.steps * args.batch > order.numel():
        raise SystemExit(f"only {order.numel()} training chunks; lower --steps or --batch")
    eval_chunks = eval_chunks[:: max(1, eval_chunks.shape[0] // args.eval_chunks)][: args.eval_chunks]
    data = {"train": train_chunks, "eval": eval_chunks, "order": order}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    initial_eval = eval_loss(model, eval_chunks, args.batch)

    runs = {}
    for name, factory in variants.items():
        runs[name] = train(name, factory, model, initial, data, args)
    model.load_state_dict(initial)
    timing = interleaved_step_times(model, variants, train_chunks[order[: args.batch]], args.timing_rounds)

    fp32 = runs["torch AdamW (fp32)"]
    for run in runs.values():
        run["state_bytes_vs_fp32"] = run["optimizer_state_bytes"] / fp32["optimizer_state_bytes"]
        run["eval_loss_minus_fp32"] = run["eval_loss"] - fp32["eval_loss"]
    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "corpus": "pydoc_data.topics (CPython), 90% train / evenly spaced chunks of the last 10% for eval",
            "train_chunks": train_chunks.shape[0],
            "eval_tokens": eval_chunks.numel(),
            "initial_eval_loss": initial_eval,
            "initial_eval_perplexity": math.exp(initial_eval),
            "torch": torch.__version__,
            **{k: v for k, v in vars(args).items()},
            "schedule": "linear warmup over steps/10, then constant; grad-norm clipping at 1.0",
        },
        "peers_unavailable": missing,
        "code_tables_equal": tables,
        "runs": runs,
        "optimizer_step_time_interleaved": timing,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")
    for name, run in runs.items():
        print(
            f"{name:36s} train(last5) {run['final_train_loss_last5']:.4f}  eval ppl {run['eval_perplexity']:.3f}  "
            f"state {run['optimizer_state_bytes'] / 2**20:8.1f} MiB ({run['state_bytes_vs_fp32']:.3f}x)  "
            f"step {timing[name]['wall_vs_torch']:.2f}x wall, {timing[name]['cpu_vs_torch']:.2f}x cpu"
        )


if __name__ == "__main__":
    main()
