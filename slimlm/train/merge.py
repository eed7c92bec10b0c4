"""Fold a LoRA adapter into its base model and write a plain HF checkpoint directory the engine serves.

The output is config.json + model.safetensors + tokenizer files (+ generation_config.json):
`slimlm.loading.load(output_dir)`, transformers and other HF tools read it. Quantized layers of the base
are dequantized, so the result is a full float checkpoint. An adapter trained with QLoRA is merged into
the same 4-bit RTN base it was trained on (re-quantized from the float base, deterministically), so the
merged model computes what the trained model computed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.train.lora import apply_lora, dequantize_linear, is_quantized, load_lora_state_dict, merge_lora

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty directory unless `overwrite` (nothing is written by this check)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimlmError(f"output directory {out} is not empty; pick another one or pass --overwrite")
    return out


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized linear (and quantized embedding) by a float module; returns how many."""
    from slimlm.quant.embedding import QuantEmbedding

    embeds = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantEmbedding)]
    tables = {id(m.table) for _, m in embeds}
    tied_heads = [(name, m) for name, m in model.named_modules() if id(m) in tables]
    swaps = [(name, dequantize_linear(m, dtype)) for name, m in model.named_modules()
             if is_quantized(m) and id(m) not in tables]  # fmt: skip
    for name, module in embeds:
        weight = module.dequantized_table(torch.float32).to(dtype)
        embedding = nn.Embedding(*weight.shape, device=weight.device, dtype=dtype)
        embedding.weight.copy_(weight)
        swaps.append((name, embedding))
        for head_name, head in tied_heads:
            if module.tied and head is module.table:  # keep the tie: the float head shares the weight
                linear = nn.Linear(
                    *reversed(weight.shape), bias=head.bias is not None, device=weight.device, dtype=dtype
                )
                linear.weight = embedding.weight
                if module.lookup_scale is not None:  # AWQ head (table W·s): unfold s from the final norm
                    _unfold_head_scale(model, module.lookup_scale.float())
                if head.bias is not None:
                    linear.bias.copy_(head.bias.float())
                swaps.append((head_name, linear))
    for name, replacement in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return len(swaps)


def _unfold_head_scale(model: nn.Module, scale: torch.Tensor) -> None:
    """norm.weight·s with a tied float weight W·s / s gives the same logits as the quantized pair."""
    from slimlm.quant.head import final_norm

    norm = final_norm(model)
    for name in ("weight", "bias"):
        tensor = getattr(norm, name, None)
        if tensor is not None:
            tensor.mul_(scale.to(tensor.dtype))


def save_hf_checkpoint(
    loaded, model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write `model` (no LoRA, no quantized layers) with `loaded`'s config and tokenizer as an HF directory.

    `state` replaces the model's own parameters (e.g. gathered from FSDP shards), keyed like them.
    """
    from safetensors.torch import save_file

    if any(is_quantized(m) for m in model.modules()):
        raise SlimlmError("save_hf_checkpoint writes float models; dequantize or merge first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:  # shared (tied) tensors appear once, under the embedding's name
        state = {name: p.detach() for name, p in model.named_parameters()}
    state = {k: (t.to(dtype) if dtype is not None else t).contiguous().cpu() for k, t in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = dataclasses.replace(loaded.config, quantization=None, torch_dtype=dtype_name)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(loaded, out)
    return out


def _save_tokenizer(loaded, out: Path) -> None:
    source = Path(loaded.source) if loaded.source is not None else None
    if source is not None and source.is_dir() and (source / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        return
    # From a GGUF: write the tokenizer that slimlm built from its metadata.
    tok = loaded.tokenizer
    (out / "tokenizer.json").write_text(tok.backend.to_str())
    tok_config = dict(tok.special_tokens)
    if tok.chat_template:
        tok_config["chat_template"] = tok.chat_template if isinstance(tok.chat_template, str) else [
            {"name": k, "template": v} for k, v in tok.chat_template.items()]  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    gen = {k: v for k, v in (loaded.generation_config or {}).items() if v is not None}
    if gen:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, model: str | None = None, dtype: str = "float32",
    overwrite: bool = False, progress: bool = True,
) -> Path:  # fmt: skip
    """Load the base (`model`, or the one the adapter names), add the adapter, merge and save."""
    from slimlm.loading import load, parse_dtype
    from slimlm.loading.default_model import resolve_model_path
    from slimlm.output_dir import check_not_overlapping, staged_output
    from slimlm.train.peft_format import read_peft_adapter

    out = check_output_dir(out_dir, overwrite)
    torch_dtype = parse_dtype(dtype)
    lora, state, notes = read_peft_adapter(adapter_dir)
    base = model if model is not None else notes.get("base_model")
    # The merged files replace same-named ones with --overwrite: never the base's own, nor the adapter's.
    check_not_overlapping(out, resolve_model_path(base), "--output", "the base model")
    if out.expanduser().resolve() == Path(adapter_dir).expanduser().resolve():
        raise SlimlmError(f"--output {out} is the adapter directory; choose another directory")
    loaded = load(base, dtype="float32", progress=progress)
    quant = notes.get("base_quantization")
    if quant and not any(is_quantized(m) for m in loaded.model.modules()):
        from slimlm.quant.quantize import quantize_model

        quantize_model(loaded.model, quant.get("method", "rtn"), quant["bits"], quant["group_size"],
                       progress=False, sym=quant.get("sym"),
                       quantize_embeddings=quant.get("quantize_embeddings", False))  # fmt: skip
    apply_lora(loaded.model, lora)
    load_lora_state_dict(loaded.model, state, f"adapter {adapter_dir}")
    merge_lora(loaded.model)
    dequantize_model(loaded.model, torch.float32)
    with staged_output(out, overwrite) as tmp:  # an interrupted merge leaves no half-written model
        save_hf_checkpoint(loaded, loaded.model, tmp, torch_dtype)
    return out


__all__ = ["check_output_dir", "dequantize_model", "merge_adapter", "save_hf_checkpoint"]
