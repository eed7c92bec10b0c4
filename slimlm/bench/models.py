"""Models for the benchmarks beyond the embedded one: a synthetic checkpoint with a real model's shapes.

No larger real model ships with slimlm and nothing is downloaded, so memory and speed on a model whose
weights dominate the process are measured on a checkpoint built here: SmolLM2-1.7B's exact config
(LlamaForCausalLM, hidden 2048, 24 layers, 32 heads, 32 KV heads, MLP 8192, vocab 49152, tied embeddings,
rope theta 130000), bf16 safetensors shards with random weights at realistic scales (normal, std 0.02;
RMSNorm weights 1), and the embedded SmolLM2's tokenizer. Random weights have the same bytes, memory
traffic and arithmetic as trained ones, so RSS, TTFT and tok/s are those of the real model; what they
generate is noise, so no fidelity (perplexity, agreement, text) is ever reported on them.

    build_synthetic(out_dir, SMOLLM2_1_7B)        # deterministic: same seed, same bytes
    resolve_bench_model("smollm2-1.7b-shape")     # the cached directory, built on first use
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

# SmolLM2-1.7B(-Instruct)'s config.json (HuggingFaceTB), the fields a loader reads.
SMOLLM2_1_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 130000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
SYNTHETIC = {"smollm2-1.7b-shape": SMOLLM2_1_7B}


def synthetic_cache() -> Path:
    return Path.home() / ".cache" / "slimlm" / "synthetic"


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint with this config, in HF's names and order."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, h)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, h)),
            (p + "self_attn.o_proj.weight", (h, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (vocab, h)))
    return specs


def synthetic_tensor(index: int, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor, from its own generator (seed, index): the same bytes whichever shard it lands in."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def build_synthetic(out_dir: str | Path, config: dict, seed: int = 0, shard_bytes: int | None = None) -> Path:
    """Write an HF checkpoint directory (config.json, model.safetensors, tokenizer files of the embedded
    SmolLM2) with random bf16 weights. One file, as SmolLM2-1.7B ships (its loading then reads one 3.4 GB
    mapping, as the real one does); `shard_bytes`: HF-style shards of at most that size plus an index.
    Tensors are streamed to the file one at a time (the builder holds one tensor, not the model). Written
    beside `out_dir` and renamed into place at the end: an interrupted build never looks complete."""
    from slimlm.loading.default_model import default_model_path
    from slimlm.tokenizer import Tokenizer
    from slimlm.tokenizer.save import save_tokenizer

    out = Path(out_dir).expanduser()
    if out.exists():
        raise SlimlmError(f"{out} already exists; remove it or choose another directory")
    if config.get("vocab_size", 0) < 49152:
        raise SlimlmError("the synthetic model carries SmolLM2's tokenizer: vocab_size must be >= 49152")
    specs = tensor_specs(config)
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(specs):
        nbytes = 2 * torch.Size(shape).numel()
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for s, indices in enumerate(shards):
        file = (
            "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        total += _write_safetensors(tmp / file, [(i, *specs[i]) for i in indices], seed)
        weight_map.update({specs[i][0]: file for i in indices})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(Tokenizer.from_gguf_file(default_model_path()), tmp)
    tmp.rename(out)
    return out


def _write_safetensors(path: Path, items: list[tuple[int, str, tuple[int, ...]]], seed: int) -> int:
    """The safetensors format written by hand (8-byte header length, JSON header padded to 8 bytes, the
    tensors' bytes in order) so that each tensor is generated, written and freed in turn."""
    header: dict = {"__metadata__": {"format": "pt", "synthetic": f"random normal std 0.02, seed {seed}"}}
    offset = 0
    for _, name, shape in items:
        nbytes = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for index, name, shape in items:
            f.write(synthetic_tensor(index, name, shape, seed).view(torch.int16).numpy().tobytes())
    return offset


def resolve_bench_model(model: str | None) -> str | None:
    """A benchmark's --model: a synthetic alias becomes its cached directory (built on first use, which
    takes a minute and 3.4 GB of disk for the 1.7B shape); anything else is passed through unchanged."""
    if model is None or model not in SYNTHETIC:
        return model
    out = synthetic_cache() / model
    if not (out / "config.json").is_file():
        build_synthetic(out, SYNTHETIC[model])
    return str(out)


FLOAT_VARIANTS = ("bf16",)  # what a --model directory can run besides its `slimlm quantize` checkpoints
GGUF_ONLY = ("native", "llama.cpp")


def variant_model(variant: str, model: str | None, cache: Path, checkpoint) -> tuple[str | None, str]:
    """(model argument for LLM, weights) of a bench variant. `model` None: the embedded SmolLM2 (its GGUF,
    dequantized for bf16, its own blocks for native); else an HF directory or a synthetic alias: bf16 runs
    it as it is, the w* variants run its `slimlm quantize` checkpoint (`checkpoint(variant, cache, model)`,
    made once). The GGUF-only variants need the embedded model: a SlimlmError otherwise."""
    if model is None:
        if variant in FLOAT_VARIANTS or variant in GGUF_ONLY:
            return None, "native" if variant == "native" else "float"
        return str(checkpoint(variant, cache)), "float"
    check_model_variants([variant])
    model = resolve_bench_model(model)
    if variant in FLOAT_VARIANTS:
        return model, "float"
    return str(checkpoint(variant, cache, model)), "float"


def check_model_variants(names: list[str]) -> None:
    """A SlimlmError for the variants that cannot run a --model directory (before anything runs)."""
    wrong = [n for n in names if n in GGUF_ONLY]
    if wrong:
        raise SlimlmError(f"--variants {', '.join(wrong)} run the embedded GGUF only; with --model use "
                          "bf16 and the w* variants")  # fmt: skip


def model_tag(model: str | None) -> str:
    """The name a model's quantized bench checkpoints are cached under."""
    return "smollm2" if model is None else Path(model).expanduser().resolve().name


def merge_variant_results(files: list[Path]) -> dict:
    """Join the variant rows of several `engine_bench.py --variants` results (e.g. one variant per quiet
    hold: a 1.7B model's variants do not fit one) and recompute the ratios against bf16 and llama.cpp.
    A variant present in several files: the last one wins. Settings that differ are kept per file."""
    rows, settings = {}, []
    for file in files:
        data = json.loads(Path(file).read_text())
        settings.append({"file": str(file), **data.get("settings", {})})
        for name, row in data.get("variants", {}).items():
            rows[name] = {k: v for k, v in row.items() if "_vs_" not in k}
    from slimlm.bench.rounds import add_ratios

    add_ratios(rows, [])  # separate holds have no rounds to pair: ratios of the medians
    from slimlm.bench.variants import add_roofline

    measured = [b * 1e9 for row in rows.values() for b in row.get("read_bandwidth_measured_gb_s", [])]
    if measured:  # one machine, one bandwidth: the highest any of the files measured
        add_roofline(rows, measured)
    return {"settings": {"merged_from": settings}, "variants": rows}
