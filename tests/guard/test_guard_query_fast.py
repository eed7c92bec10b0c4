"""The guard's per-response query path (`Embedder.encode_query`: one padded batch; ONNX Runtime fp32 on the
transformer-optimized graph by default, the plain exported graph when the optimizer is unavailable or
its graph fails, PyTorch fp32 or bf16 autocast on request) against sentence-transformers' own `encode`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from tests.guard.conftest import SHOP

_REPLIES = [json.loads(line)["text"] for line in (SHOP / "replies.jsonl").read_text().splitlines()]
# model answers of very different lengths (1 to ~300 tokens), several per call as with n > 1
ANSWERS = [
    "Yes.",
    "You can return unworn items with their tags within 30 days of delivery for a full refund.",
    " ".join(_REPLIES[:6]),
    " ".join(_REPLIES[6:20]),  # ~300 tokens: past the model's 256, truncated as encode does
    "Unsere Lieferzeit beträgt drei bis fünf Werktage.",
]


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto", "onnx"])
def test_query_vectors_equal_sentence_transformers_encode(embedder, st_model, precision):
    from slimlm.guard.embedder import Embedder

    if precision == "onnx":
        pytest.importorskip(
            "onnxruntime", reason="the ONNX query path needs the guard extra: pip install 'slimlm[guard]'"
        )
    e = embedder if precision == "auto" else Embedder(query_precision=precision)
    for texts in (ANSWERS, ANSWERS[:3], *([a] for a in ANSWERS)):  # padded batches and single answers
        got = e.encode_query(texts)
        want = st_model.encode(texts, normalize_embeddings=True)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        cos = (got * want).sum(axis=1)
        assert cos.min() >= 0.9999, (texts, cos)
        if not e.query_bf16:
            assert cos.min() >= 0.999999, cos  # same arithmetic as encode, only batched differently


def test_auto_runs_on_onnx_runtime_when_installed(embedder):
    pytest.importorskip(
        "onnxruntime", reason="the ONNX query path needs the guard extra: pip install 'slimlm[guard]'"
    )
    embedder.prepare_query()
    assert embedder._onnx is not None, embedder.onnx_reason
    assert not embedder.query_bf16  # exact by default: decisions equal calibrate's (docs/guard.md)


def test_bad_query_precision_is_one_clear_error():
    from slimlm.guard.embedder import Embedder

    with pytest.raises(SlimlmError, match="precision must be one of auto, onnx, bf16, fp32"):
        Embedder(query_precision="int8")


def _onnx_runtime():
    return pytest.importorskip(
        "onnxruntime", reason="the ONNX query path needs the guard extra: pip install 'slimlm[guard]'"
    )


def test_auto_runs_the_optimized_graph(embedder):
    """The default query path is ONNX Runtime's transformer-optimized graph (fused attention, bias +
    GELU, residual + LayerNorm), still fp32: its vectors are checked against encode above."""
    _onnx_runtime()
    embedder.prepare_query()
    assert embedder._onnx is not None, embedder.onnx_reason
    assert embedder._onnx.notes == "" and "optimized graph" in embedder.query_path, embedder.query_path


def _plain_fallback(embedder, cache):
    """OnnxQuery.create over a cache that already holds the export (so nothing is re-exported)."""
    from slimlm.guard.embedder import cache_dir
    from slimlm.guard.onnx_query import OnnxQuery, cache_paths

    embedder.prepare_query()
    exported, optimized = cache_paths(embedder.path, cache_dir())
    mine, my_optimized = cache_paths(embedder.path, cache)
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.symlink_to(exported)
    return OnnxQuery, mine, my_optimized


@pytest.fixture(scope="module")
def encoded(st_model):
    """sentence-transformers' own vectors of ANSWERS (the reference), computed once."""
    return st_model.encode(ANSWERS, normalize_embeddings=True)


def _check_against_encode(query, embedder, want):
    from slimlm.guard.onnx_query import _tokenize

    got = query.embed(_tokenize(embedder.model, ANSWERS))  # one padded batch
    assert (got * want).sum(axis=1).min() >= 0.999999
    for i in (0, 3):  # single answers: the shortest, and one past the model's 256 tokens
        got = query.embed(_tokenize(embedder.model, [ANSWERS[i]]))
        assert float(got[0] @ want[i]) >= 0.999999


def test_without_the_optimizer_the_plain_graph_runs(embedder, encoded, tmp_path, monkeypatch):
    """onnxruntime's transformers optimizer missing: the plain exported graph serves, exact, and says why."""
    _onnx_runtime()
    OnnxQuery, _, optimized = _plain_fallback(embedder, tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime.transformers.optimizer", None)
    query, reason = OnnxQuery.create(embedder.model, embedder.path, tmp_path, 2)
    assert query is not None, reason
    assert query.kind.endswith("plain graph")
    assert "transformer optimizer is unavailable" in query.notes
    assert not optimized.exists()
    _check_against_encode(query, embedder, encoded)


def test_a_broken_optimized_graph_falls_back_to_the_plain_one(embedder, encoded, tmp_path):
    _onnx_runtime()
    OnnxQuery, _, optimized = _plain_fallback(embedder, tmp_path)
    optimized.write_bytes(b"not an onnx model")  # a damaged cache entry
    query, reason = OnnxQuery.create(embedder.model, embedder.path, tmp_path, 2)
    assert query is not None, reason
    assert query.kind.endswith("plain graph") and "optimized graph failed" in query.notes
    _check_against_encode(query, embedder, encoded)


def test_optimized_graph_is_built_into_an_empty_cache(embedder, encoded, tmp_path):
    """The optimizer run itself (not only its cached output): fuses every layer's attention, agrees
    with encode."""
    onnx = pytest.importorskip("onnx", reason="the ONNX query path needs the guard extra")
    _onnx_runtime()
    OnnxQuery, _, optimized = _plain_fallback(embedder, tmp_path)
    query, reason = OnnxQuery.create(embedder.model, embedder.path, tmp_path, 2)
    assert query is not None and query.notes == "", (reason, query and query.notes)
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    layers = embedder.model[0].auto_model.config.num_hidden_layers
    assert ops.count("Attention") == layers and "Softmax" not in ops
    _check_against_encode(query, embedder, encoded)
