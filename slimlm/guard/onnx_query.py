"""The guard's per-response embedding on ONNX Runtime: the same fp32 arithmetic as sentence-transformers'
`encode`, with less overhead per call than PyTorch eager.

Faster than PyTorch eager fp32 at every answer length measured, and as fast as PyTorch's bf16 autocast
up to ~130 tokens while keeping encode's vectors, so snapping decisions equal calibrate's (docs/guard.md,
"Latency"). Only the model families it can reproduce exactly are exported: a Hugging Face encoder (the
`Transformer` module) followed by mean pooling and an optional `Normalize`. The export (PyTorch's
TorchScript ONNX exporter, a few seconds) is cached under `$SLIMLM_CACHE/embedding-models/onnx/`, and
each session is checked against `encode` on a probe before it is used; anything else leaves the guard
on PyTorch with the reason in `OnnxQuery.create`'s second result.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# exported and checked on a padded batch: a batch without padding would let the exporter trace away the
# attention mask (transformers drops an all-ones mask), and answers of n > 1 choices are padded
PROBES = [
    "Thanks for asking: orders ship within two business days, and returns are free for 30 days.",
    "Yes.",
]


def _tokenize(model, texts: list[str]):
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


def _fingerprint(model_dir: Path) -> str:
    """Hash of the model directory's files (names, sizes, mtimes): a changed model re-exports."""
    h = hashlib.sha1()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(model_dir)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _shape(model) -> str | None:
    """Why this sentence-transformers model cannot run here, or None when it can."""
    mods = list(model)
    kinds = [type(m).__name__ for m in mods]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"modules {kinds} (needs Transformer, Pooling[, Normalize])"
    pooling = mods[1]
    if getattr(pooling, "pooling_mode", None) != "mean" or not getattr(pooling, "include_prompt", True):
        return "pooling is not plain mean pooling"
    return None


def _export(model, path: Path) -> None:
    import torch

    encoder = model[0].auto_model
    features = _tokenize(model, PROBES)
    names = [n for n in INPUTS if n in features]

    class Wrapped(torch.nn.Module):
        def __init__(self, enc) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, *args):
            return self.enc(**dict(zip(names, args, strict=True))).last_hidden_state

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are about shapes we make dynamic
        torch.onnx.export(
            Wrapped(encoder).eval(),
            tuple(features[n] for n in names),
            str(tmp),
            input_names=names,
            output_names=["hidden"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)


class OnnxQuery:
    """An ONNX Runtime session over the encoder; pooling and normalization in numpy."""

    def __init__(self, session, input_names: list[str]) -> None:
        self.session = session
        self.input_names = input_names

    @classmethod
    def create(cls, model, model_dir: Path, cache: Path, threads: int) -> tuple[OnnxQuery | None, str]:
        """(the session, "") or (None, why not). Never raises for an unusable model."""
        try:
            import onnxruntime as ort
        except ImportError:
            return None, "onnxruntime is not installed (pip install 'slimlm[guard]')"
        why = _shape(model)
        if why:
            return None, why
        try:
            path = cache / "onnx" / f"{Path(model_dir).name}-{_fingerprint(Path(model_dir))}.onnx"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                _export(model, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.inter_op_num_threads = 1
            # no busy-waiting after a call: in the server the decode kernel's threads need the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            query = cls(session, names)
            # checked against sentence-transformers itself before it is trusted
            want = np.asarray(model.encode(PROBES, convert_to_numpy=True), dtype=np.float32)
            got = query.embed(_tokenize(model, PROBES))
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
            cos = float((got * want).sum(axis=1).min())
            if cos < 0.99999:
                return None, f"the exported model disagrees with encode (cosine {cos:.6f})"
            return query, ""
        except Exception as e:  # noqa: BLE001 - an export or runtime problem: stay on PyTorch
            return None, f"ONNX export or session failed ({type(e).__name__}: {str(e)[:200]})"

    def embed(self, features) -> np.ndarray:
        """Unit vectors [n, dim] from tokenized features (what the model's `preprocess` returns)."""
        feed = {n: np.ascontiguousarray(features[n].numpy(), dtype=np.int64) for n in self.input_names}
        hidden = self.session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        v = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        # the guard needs unit vectors whether or not the model normalizes (inner product = cosine)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)
