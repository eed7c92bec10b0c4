"""The guard's per-response query path (`Embedder.encode_query`: one padded batch; ONNX Runtime fp32
by default, PyTorch fp32 or bf16 autocast on request) against sentence-transformers' own `encode`."""

from __future__ import annotations

import json

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
