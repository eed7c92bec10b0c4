"""4-bit (and 8-bit) weight recipes against the float model and llama.cpp's own quantizations (issue 19).

    python benchmarks/weight_fidelity.py [--tokens 2048] [--texts pydoc,gpl3] [--variants a,b,...]

Every variant is the embedded SmolLM2-135M-Instruct (the reference: the GGUF dequantized to bf16),
quantized in memory with `slimlm.quant.quantize_model` (calibration: `calibration_text()`, the pydoc
slice disjoint from the `pydoc` evaluation slice; GPL-3 is used by nothing but evaluation), or, for the
`llama.cpp-*` variants, the GGUF re-quantized by `llama-quantize --allow-requantize` ($LLAMA_CPP_BIN or
--llama-bin, default /work/tools/llama-build/bin; skipped with a message when missing) and loaded by
slimlm's GGUF loader. All compute in bf16 over the same 512-token windows of each text: Δppl, mean /
p99 KL(reference || variant), top-1 agreement, and bits per weight (all weight bytes x 8 / parameters,
norms included, a tied table counted once; for a GGUF, its tensor data).

`--layout kernel` runs each quantized variant through the C kernel's GEMMs instead (activations int8 per
32, as the engine computes; rows named VARIANT@kernel).

Results are merged into --out (default benchmarks/results/weight_fidelity.json) variant by variant, and
a variant already there is not run again unless --force: a long sweep can be run in parts.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from slimlm.eval.fidelity import FidelityStats, log_probs
from slimlm.eval.perplexity import scored_windows
from slimlm.eval.texts import named_text
from slimlm.loading import load
from slimlm.loading.default_model import default_model_path
from slimlm.quant.calibration import calibration_batches
from slimlm.quant.quantize import quantize_model, quantized_weight_bytes
from slimlm.quant.rotate import rotate_model

# Mixed precision (benchmarks/weight_sensitivity.py, on the calibration text): v_proj, k_proj and
# down_proj lose the most when their groups grow from 32 to 64, so they keep group 32. MIX_BUDGET keeps
# down_proj at 32 in all but the 7 middle layers, which puts the whole model under llama.cpp Q4_0's bytes.
MIX = {"self_attn.v_proj": 32, "self_attn.k_proj": 32, "mlp.down_proj": 32}
MIX_BUDGET = {"self_attn.v_proj": 32, "self_attn.k_proj": 32,
              **{f"{i}.mlp.down_proj": 32 for i in (*range(12), *range(19, 30))}}  # fmt: skip
# MIX_KERNEL: q/k/v share one group size, as the C kernel's fused q/k/v weight requires (kernels/qlayout.py),
# and down_proj keeps group 32 in the first and last 6 layers; also under Q4_0's bytes.
MIX_KERNEL = {"self_attn.q_proj": 32, "self_attn.k_proj": 32, "self_attn.v_proj": 32,
              **{f"{i}.mlp.down_proj": 32 for i in (*range(6), *range(24, 30))}}  # fmt: skip
FZ8 = dict(bits=4, group_size=64, embedding_bits=8, float_zero=True)

# name -> quantize_model keyword arguments
VARIANTS = {
    "w4-rtn-g64-e8-fz-mix": dict(method="rtn", **FZ8, group_sizes=MIX),
    "w4-gptq-g64-e8-fz-mix": dict(method="gptq", **FZ8, group_sizes=MIX),
    "w4-rtn-g64-e8-fz-mixb": dict(method="rtn", **FZ8, group_sizes=MIX_BUDGET),
    "w4-gptq-g64-e8-fz-mixb": dict(method="gptq", **FZ8, group_sizes=MIX_BUDGET),
    "w4-rtn-g64-e8-fz-mixk": dict(method="rtn", **FZ8, group_sizes=MIX_KERNEL),
    "w4-gptq-g64-e8-fz-mixk": dict(method="gptq", **FZ8, group_sizes=MIX_KERNEL),
    "w4-rtn-g64": dict(method="rtn", bits=4, group_size=64),
    "w4-gptq-g64": dict(method="gptq", bits=4, group_size=64),
    "w4-rtn-g64-e8": dict(method="rtn", bits=4, group_size=64, embedding_bits=8),
    "w4-gptq-g64-e8": dict(method="gptq", bits=4, group_size=64, embedding_bits=8),
    "w4-awq-g64-e8": dict(method="awq", bits=4, group_size=64, embedding_bits=8),
    "w4-rtn-g64-e8-fz": dict(method="rtn", bits=4, group_size=64, embedding_bits=8, float_zero=True),
    "w4-gptq-g64-e8-fz": dict(method="gptq", bits=4, group_size=64, embedding_bits=8, float_zero=True),
    "w4-awq-g64-e8-fz": dict(method="awq", bits=4, group_size=64, embedding_bits=8, float_zero=True),
    "w4-rtn-g32-e8-fz": dict(method="rtn", bits=4, group_size=32, embedding_bits=8, float_zero=True),
    "w4-gptq-g32-e8-fz": dict(method="gptq", bits=4, group_size=32, embedding_bits=8, float_zero=True),
    "w4-rtn-g32-fz": dict(method="rtn", bits=4, group_size=32, float_zero=True),
    "w4-rtn-g64-fz": dict(method="rtn", bits=4, group_size=64, float_zero=True),
    # Rotation (slimlm/quant/rotate.py: norms folded, residual stream and value heads rotated by random
    # Hadamard matrices; the tied table is untied) and AWQ + GPTQ. "method": "none" = rotated, unquantized.
    "w4-rot-float": dict(method="none", rotate="hadamard"),
    "w4-rot-rtn-g64": dict(method="rtn", bits=4, group_size=64, rotate="hadamard"),
    "w4-rot-rtn-g64-e8": dict(method="rtn", bits=4, group_size=64, embedding_bits=8, rotate="hadamard"),
    "w4-rot-gptq-g64": dict(method="gptq", bits=4, group_size=64, rotate="hadamard"),
    "w4-rot-gptq-g64-e8": dict(method="gptq", bits=4, group_size=64, embedding_bits=8, rotate="hadamard"),
    "w4-rot-gptq-g64-e8-fz": dict(method="gptq", **FZ8, rotate="hadamard"),
    "w4-awqgptq-g64": dict(method="awq-gptq", bits=4, group_size=64),
    "w4-awqgptq-g64-e8": dict(method="awq-gptq", bits=4, group_size=64, embedding_bits=8),
    "w4-rot-awqgptq-g64": dict(method="awq-gptq", bits=4, group_size=64, rotate="hadamard"),
    "w4-rot-awqgptq-g64-e8": dict(
        method="awq-gptq", bits=4, group_size=64, embedding_bits=8, rotate="hadamard"
    ),
    "w4-awqgptq-g64-e8-fz": dict(method="awq-gptq", **FZ8),
    "w4-awqgptq-g32-e8": dict(method="awq-gptq", bits=4, group_size=32, embedding_bits=8),
    "w4-awqgptq-g32-e8-fz": dict(method="awq-gptq", **{**FZ8, "group_size": 32}),
    "w4-rot-awqgptq-g32-e8": dict(
        method="awq-gptq", bits=4, group_size=32, embedding_bits=8, rotate="hadamard"
    ),
    "w4-rot-gptq-g32-e8": dict(method="gptq", bits=4, group_size=32, embedding_bits=8, rotate="hadamard"),
    "w4-rot-gptq-g32": dict(method="gptq", bits=4, group_size=32, rotate="hadamard"),
    # Grid search per group (slimlm/quant/search.py, `--scale-search`): "mse" least squared rounding error,
    # "imx" weighted by the importance matrix (E[x_j²] of the calibration inputs, as llama.cpp's imatrix);
    # with rtn that is llama.cpp-style imatrix quantization, with gptq / awq-gptq the grid GPTQ starts from.
    **{
        f"w4-{m.replace('-', '')}-g64{e}{fz}-{tag}": dict(
            method=m,
            bits=4,
            group_size=64,
            scale_search=search,
            **({"embedding_bits": 8} if e else {}),
            **({"float_zero": True} if fz else {}),
        )
        for m in ("rtn", "gptq", "awq-gptq")
        for e in ("", "-e8")
        for fz in ("", "-fz")
        for search, tag in (("mse", "mse"), ("imatrix", "imx"))
    },  # fmt: skip
    # decoder only (embedding and head float, the 8-bit default until the int8 g32 table)
    "w8-channel": dict(method="rtn", bits=8, group_size=-1, quantize_embeddings=False),
    "w8-g64": dict(method="rtn", bits=8, group_size=64, quantize_embeddings=False),
    "w8-g32": dict(method="rtn", bits=8, group_size=32, quantize_embeddings=False),
    "w8-channel-e8": dict(method="rtn", bits=8, group_size=-1, quantize_embeddings=True),
    # the 8-bit table: per-channel (wide grid) or Q8_0's groups of 32 (narrow grid), beside a g64 decoder;
    # w8-g64-t32 is `slimlm quantize --bits 8`'s default on SmolLM2
    "w8-g64-tch": dict(
        method="rtn", bits=8, group_size=64, quantize_embeddings=True, embedding_group_size=-1
    ),
    "w8-g64-t32": dict(
        method="rtn", bits=8, group_size=64, quantize_embeddings=True, embedding_group_size=32
    ),
    "llama.cpp-Q4_0": "Q4_0",
    "llama.cpp-Q4_K_M": "Q4_K_M",
}


def parameter_count(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def gguf_bits_per_weight(path: Path) -> float:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def llama_cpp_variant(qtype: str, bin_dir: Path, cache: Path):
    tool = bin_dir / "llama-quantize"
    if not tool.is_file():
        print(f"skipping llama.cpp {qtype}: {tool} not found (set --llama-bin or $LLAMA_CPP_BIN)")
        return None
    out = cache / f"smollm2-135m-{qtype}.gguf"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [str(tool), "--allow-requantize", str(default_model_path()), str(out), qtype, "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


@torch.inference_mode()
def evaluate(model, texts, refs, context) -> dict:
    result = {}
    for name, ids in texts.items():
        stats = FidelityStats()
        offset = 0
        for logits, targets in scored_windows(model, ids, context, progress=False):
            n = len(targets)
            stats.add_logprobs(refs[name][offset : offset + n], logits, targets)
            offset += n
        result[name] = stats.summary()
    return result


def layout_of(name: str, row: dict) -> str | None:
    """The layout in benchmarks/weight_decode_speed.py that decodes at this variant's speed."""
    recipe = row.get("recipe")
    if not isinstance(recipe, dict):
        return name if name.startswith("llama.cpp-") else None
    if "bits" not in recipe:
        return None  # rotated, unquantized
    if recipe["bits"] == 8:
        return "w8-channel" if recipe["group_size"] == -1 else f"w8-g{recipe['group_size']}"
    layout = f"w4-g{recipe['group_size']}" + ("-e8" if recipe.get("embedding_bits") == 8 else "")
    if recipe.get("group_sizes"):
        layout += "-" + name.rsplit("-", 1)[-1]  # mixb / mixk
    return layout + ("-rot" if recipe.get("rotate") else "")


def markdown_tables(saved: dict, speeds: dict, names: list[str]) -> str:
    """docs/quantization.md's tables, one per text, with the decode tok/s of each variant's layout."""
    lines = []
    titles = {
        "pydoc": "pydoc_data.topics evaluation slice",
        "gpl3": "GPL-3 (/usr/share/common-licenses/GPL-3)",
    }
    for text in ("pydoc", "gpl3"):
        first = next(r["texts"][text] for r in saved["variants"].values() if text in r.get("texts", {}))
        lines += [f"**{titles[text]}** ({saved['tokens_per_text']} scored tokens, reference perplexity {first['ref_ppl']:.3f})", "",
                  "| variant | weight MiB | bits/weight | Δppl | KL mean | KL p99 | top-1 | decode tok/s (layout) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        base = speeds.get("bf16", {}).get("decode_tok_s")
        if base:
            lines.append(
                f"| bf16 (reference) | {saved['reference']['params'] * 2 / 2**20:.1f} | 16.00 | — | — | — | — | {base:.0f} |"
            )
        for name in names:
            row = saved["variants"].get(name)
            if row is None or text not in row.get("texts", {}):
                continue
            r, layout = row["texts"][text], layout_of(name, row)
            speed = speeds.get(layout, {}).get("decode_tok_s") if layout else None
            shown = "native GGUF" if layout and layout.startswith("llama.cpp") else layout
            speed_cell = f"{speed:.0f} ({shown})" if speed else "—"
            lines.append(f"| {name} | {row['weight_bytes'] / 2**20:.1f} | {row['bits_per_weight']:.2f} | "
                         f"{r['delta_ppl_pct']:+.2f}% | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1_agree']:.3f} | {speed_cell} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--texts", default="pydoc,gpl3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN", "/work/tools/llama-build/bin"))
    ap.add_argument("--gguf-cache", default=str(Path.home() / ".cache/slimlm/bench/requant"))
    ap.add_argument("--out", default="benchmarks/results/weight_fidelity.json")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out and stop")
    ap.add_argument("--speeds", default="benchmarks/results/weight_decode_speed.json")
    ap.add_argument(
        "--layout",
        choices=("torch", "kernel"),
        default="torch",
        help="kernel: run each quantized variant on the C kernel's GEMMs (int8 activations per 32, as the "
        "engine computes; stored as VARIANT@kernel) instead of PyTorch's bf16 modules",
    )
    args = ap.parse_args()
    if args.table:
        speeds = Path(args.speeds)
        speeds = json.loads(speeds.read_text())["layouts"] if speeds.is_file() else {}
        print(markdown_tables(json.loads(Path(args.out).read_text()), speeds, args.variants.split(",")))
        return
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if saved and (saved.get("tokens_per_text"), saved.get("context")) != (args.tokens, args.context):
        raise SystemExit(f"{out_path} holds another window setting; use another --out")
    saved.update(tokens_per_text=args.tokens, context=args.context, calib_samples=args.calib_samples)
    results = saved.setdefault("variants", {})
    suffix = "@kernel" if args.layout == "kernel" else ""
    todo = [n for n in args.variants.split(",") if args.force or n + suffix not in results]
    if not todo:
        print("nothing to run: every variant is in", out_path)
        return

    loaded = load(None, dtype="bfloat16", progress=False)
    base, tok = loaded.model, loaded.tokenizer
    texts = {
        t: tok.encode(named_text(t), add_special_tokens=False)[: args.tokens + 1]
        for t in args.texts.split(",")
    }
    refs = {}
    with torch.inference_mode():
        for name, ids in texts.items():
            refs[name] = torch.cat(
                [log_probs(lg).half() for lg, _ in scored_windows(base, ids, args.context, progress=False)]
            )
    n_params = parameter_count(base)
    saved["reference"] = {"bits_per_weight": 8 * quantized_weight_bytes(base) / n_params, "params": n_params}
    calib = calibration_batches(
        lambda s: tok.encode(s, add_special_tokens=False), num_samples=args.calib_samples
    )

    for name in todo:
        spec = VARIANTS[name]
        start = time.perf_counter()
        if suffix and isinstance(spec, str):
            print(f"{name}: a GGUF variant, not run with --layout kernel")
            continue
        if isinstance(spec, str):
            path = llama_cpp_variant(spec, Path(args.llama_bin), Path(args.gguf_cache))
            if path is None:
                continue
            model = load(str(path), dtype="bfloat16", progress=False).model
            row = {
                "recipe": f"llama-quantize --allow-requantize {spec}",
                "bits_per_weight": gguf_bits_per_weight(path),
            }
        elif "rotate" in spec:  # rotated and quantized in float32 (as `slimlm quantize` does), run in bf16
            model = copy.deepcopy(base).float()
            if spec["method"] == "none":
                config = {"rotate": rotate_model(model, spec["rotate"])}
            else:
                config = quantize_model(model, calib_batches=calib, progress=False, **spec)
            model.to(torch.bfloat16)
            row = {"recipe": config, "bits_per_weight": 8 * quantized_weight_bytes(model) / n_params}
        else:
            model = copy.deepcopy(base)
            config = quantize_model(model, calib_batches=calib, progress=False, **spec)
            row = {"recipe": config, "bits_per_weight": 8 * quantized_weight_bytes(model) / n_params}
        row["weight_bytes"] = round(row["bits_per_weight"] * n_params / 8)
        row["quantize_s"] = time.perf_counter() - start
        if suffix:
            from slimlm.kernels.qlayout import quantized_reason, to_kernel_layout

            reason = quantized_reason(model)
            if reason:
                print(f"{name}: not on the kernel ({reason}); skipped")
                continue
            to_kernel_layout(model)
            row["layout"] = "kernel"
        name = name + suffix
        row["texts"] = evaluate(model, texts, refs, args.context)
        results[name] = row
        summary = "  ".join(
            f"{t} {r['delta_ppl_pct']:+6.2f}% KL {r['kl_mean']:.4f}/{r['kl_p99']:.3f} top1 {r['top1_agree']:.3f}"
            for t, r in row["texts"].items()
        )
        print(f"{name:22s} {row['bits_per_weight']:.2f} bpw  {summary}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(saved, indent=2, default=str))
        del model
        gc.collect()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
