"""LoRA adapters in Hugging Face PEFT's format, so PEFT (and tools built on it) load what slimlm trains.

adapter_config.json         PEFT's LoraConfig (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...)
adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], ...lora_B.weight [out, r]
slimlm_adapter.json         slimlm's own notes: the base model and, for QLoRA, its 4-bit quantization
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.train.lora import LoraConfig, lora_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SLIMLM_FILE = "slimlm_adapter.json"
PREFIX = "base_model.model."


def save_peft_adapter(
    model: nn.Module, lora: LoraConfig, out_dir: str | Path, base_model: str | None,
    base_quantization: dict | None = None, state: dict[str, torch.Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write the adapter of `model` (or an explicit adapter `state`) in PEFT's layout into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    tensors = {PREFIX + k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # the modules actually adapted (the defaults list every family's names; PEFT wants this model's)
        "target_modules": sorted({k.rsplit(".", 3)[-3] for k in state} or set(lora.target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    notes = {"format_version": 1, "base_model": base_model, "base_quantization": base_quantization}
    (out / SLIMLM_FILE).write_text(json.dumps(notes, indent=2))
    return out


def read_peft_adapter(adapter_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(LoraConfig, adapter weights keyed by slimlm module names, slimlm notes or {})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    if not (path / CONFIG_FILE).is_file():
        raise SlimlmError(f"{path} is not a LoRA adapter: {CONFIG_FILE} is missing")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{path / CONFIG_FILE} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise SlimlmError(f"{path / CONFIG_FILE} is not text (binary or corrupt)") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise SlimlmError(
            f"{path} holds a {config.get('peft_type')} adapter; slimlm merges LoRA adapters only"
        )
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "use_rslora") if config.get(k)]
    unsupported += [
        k
        for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
        if config.get(k)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise SlimlmError(
            f"{path}: adapter options {', '.join(unsupported)} are not supported by slimlm merge"
        )
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise SlimlmError(f"{path}: target_modules as a regex is not supported; list the module names")
    lora = LoraConfig(int(config["r"]), float(config.get("lora_alpha", 8)), float(config.get("lora_dropout", 0.0)),
                      tuple(targets or ()))  # fmt: skip
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise SlimlmError(f"{path} has no {WEIGHTS_FILE} (slimlm reads safetensors adapters only)")
    try:
        raw = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise SlimlmError(f"{weights_file} is truncated or corrupt ({e})") from None
    state = {}
    for key, value in raw.items():
        name = key.removeprefix(PREFIX).replace(".default.", ".")
        state[name] = value
    notes = {}
    if (path / SLIMLM_FILE).is_file():
        try:
            notes = json.loads((path / SLIMLM_FILE).read_text())
        except ValueError:  # not JSON, or not text
            raise SlimlmError(
                f"{path / SLIMLM_FILE} is corrupt; restore it or delete it and pass --model"
            ) from None
    return lora, state, notes


__all__ = ["CONFIG_FILE", "SLIMLM_FILE", "WEIGHTS_FILE", "read_peft_adapter", "save_peft_adapter"]
