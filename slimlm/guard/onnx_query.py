"""The guard's per-response embedding on ONNX Runtime: the same fp32 arithmetic as sentence-transformers'
`encode`, with less overhead per call than PyTorch eager.

Faster than PyTorch eager fp32 at every answer length measured, keeping encode's vectors, so snapping
decisions equal calibrate's (docs/guard.md, "Latency"). Only the model families it can reproduce exactly
are exported: a Hugging Face encoder (the `Transformer` module) followed by mean pooling and an optional
`Normalize`. The encoder is exported with eager attention (PyTorch's TorchScript ONNX exporter, a few
seconds), then ONNX Runtime's transformer optimizer fuses each layer's attention, bias + GELU and
residual + LayerNorm into single fp32 kernels (still fp32: only the kernels change). Both files are cached
under `$SLIMLM_CACHE/embedding-models/onnx/`. Each session is checked against `encode` on a padded probe
before it is used; the chain is optimized graph -> plain exported graph -> PyTorch (the caller), with
the reason for every step down kept (`OnnxQuery.notes`, `OnnxQuery.create`'s second result).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
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
# cosine to encode's vectors on the probes below which a session is not used: the measured worst case
# of both graphs is 0.9999999 (fp32 summed in another order); a wrong graph (e.g. a fused attention that
# misreads the padding) lands far below
MIN_PROBE_COSINE = 0.999999


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


@contextlib.contextmanager
def _eager_attention(encoder):
    """Export with transformers' eager attention: its MatMul / Softmax pattern is the one ONNX Runtime's
    optimizer fuses (the SDPA export's NaN guards hide it). Restored afterwards, so `encode` is unchanged."""
    before = getattr(encoder.config, "_attn_implementation", None)
    setter = getattr(encoder, "set_attn_implementation", None)
    try:
        if before not in (None, "eager") and setter is not None:
            setter("eager")
    except (ValueError, TypeError, AttributeError):
        pass  # this model cannot switch: exported as it is (the optimizer will then fuse less)
    try:
        yield
    finally:
        if before not in (None, "eager") and setter is not None:
            setter(before)


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
    with _eager_attention(encoder), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
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


def _optimize(model, exported: Path, path: Path) -> str:
    """ONNX Runtime's transformer optimizer over the exported encoder, written to `path`; "" when every
    layer's attention was fused, else why the optimized graph is not used."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:
        return f"onnxruntime's transformer optimizer is unavailable ({e})"
    config = model[0].auto_model.config
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    noisy = logging.getLogger("onnxruntime.transformers")
    level = noisy.level
    noisy.setLevel(logging.ERROR)  # it logs every fusion it tries
    try:
        # opt_level 0: only the optimizer's own fusions; the session applies ORT's graph optimizations
        optimized = optimize_model(
            str(exported),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=0,
        )
        fused = optimized.get_fused_operator_statistics().get("Attention", 0)
        if layers and fused != layers:
            return f"the optimizer fused attention in {fused} of {layers} layers"
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        optimized.save_model_to_file(str(tmp))
        tmp.replace(path)
    finally:
        noisy.setLevel(level)
    return ""


def cache_paths(model_dir: Path, cache: Path) -> tuple[Path, Path]:
    """The cached export and its optimized graph, keyed by the model directory's files (and the
    optimizer's output by the onnxruntime version that wrote it)."""
    import onnxruntime as ort

    stem = f"{Path(model_dir).name}-{_fingerprint(Path(model_dir))}-eager"
    exported = cache / "onnx" / f"{stem}.onnx"
    return exported, exported.with_name(f"{stem}-ort{ort.__version__}-bert.onnx")


class OnnxQuery:
    """An ONNX Runtime session over the encoder; pooling and normalization in numpy."""

    def __init__(self, session, input_names: list[str]) -> None:
        self.session = session
        self.input_names = input_names
        self.kind = "onnxruntime fp32"
        self.notes = ""  # why the optimized graph is not the one running ("" when it is)

    @classmethod
    def create(
        cls, model, model_dir: Path, cache: Path, threads: int, optimize: bool = True
    ) -> tuple[OnnxQuery | None, str]:
        """(the session, "") or (None, why not). Never raises for an unusable model. The session is the
        optimized graph when it can be built and agrees with `encode`, else the plain export; why the
        optimized one is not used is in the session's `notes`."""
        try:
            import onnxruntime as ort
        except ImportError:
            return None, "onnxruntime is not installed (pip install 'slimlm[guard]')"
        why = _shape(model)
        if why:
            return None, why
        notes = "not asked for" if not optimize else ""
        try:
            exported, optimized = cache_paths(model_dir, cache)
            if not exported.is_file():
                exported.parent.mkdir(parents=True, exist_ok=True)
                _export(model, exported)
            want = np.asarray(model.encode(PROBES, convert_to_numpy=True), dtype=np.float32)
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
            features = _tokenize(model, PROBES)
            if optimize:
                try:
                    if not optimized.is_file():
                        notes = _optimize(model, exported, optimized)
                    if not notes:
                        query = cls._session(ort, optimized, threads, "onnxruntime fp32, optimized graph")
                        cos = query._agreement(features, want)
                        if cos >= MIN_PROBE_COSINE:
                            return query, ""
                        notes = f"the optimized graph disagrees with encode (cosine {cos:.7f})"
                except Exception as e:  # noqa: BLE001 - an optimizer or contrib-op problem: plain graph
                    notes = f"the optimized graph failed ({type(e).__name__}: {str(e)[:200]})"
            query = cls._session(ort, exported, threads, "onnxruntime fp32, plain graph")
            query.notes = notes
            # checked against sentence-transformers itself before it is trusted
            cos = query._agreement(features, want)
            if cos < MIN_PROBE_COSINE:
                return None, f"the exported model disagrees with encode (cosine {cos:.7f})"
            return query, ""
        except Exception as e:  # noqa: BLE001 - an export or runtime problem: stay on PyTorch
            return None, f"ONNX export or session failed ({type(e).__name__}: {str(e)[:200]})"

    @classmethod
    def _session(cls, ort, path: Path, threads: int, kind: str) -> OnnxQuery:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting after a call: in the server the decode kernel's threads need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        query = cls(session, [i.name for i in session.get_inputs()])
        query.kind = kind
        return query

    def _agreement(self, features, want: np.ndarray) -> float:
        return float((self.embed(features) * want).sum(axis=1).min())

    def embed(self, features) -> np.ndarray:
        """Unit vectors [n, dim] from tokenized features (what the model's `preprocess` returns)."""
        feed = {n: np.ascontiguousarray(features[n].numpy(), dtype=np.int64) for n in self.input_names}
        hidden = self.session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        v = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        # the guard needs unit vectors whether or not the model normalizes (inner product = cosine)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)
