"""The guard's per-response query path (`Embedder.encode_query`: one padded batch; ONNX Runtime fp32
for answers up to onnx_query.MAX_TOKENS tokens, bf16 autocast PyTorch above on CPUs with native bf16)
against sentence-transformers' own `encode`."""

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
    " ".join(_REPLIES[6:20]),  # past MAX_TOKENS: "auto" takes the PyTorch path for this batch
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
        if precision in ("fp32", "onnx") or not e.query_bf16:
            assert cos.min() >= 0.999999, cos  # same arithmetic as encode, only batched differently


def test_auto_runs_short_answers_on_onnx_runtime_exactly(embedder, st_model):
    pytest.importorskip(
        "onnxruntime", reason="the ONNX query path needs the guard extra: pip install 'slimlm[guard]'"
    )
    from slimlm.guard.onnx_query import MAX_TOKENS

    embedder.prepare_query()
    assert embedder._onnx is not None, embedder.onnx_reason
    short = ANSWERS[:3]
    assert embedder.count_tokens([short[2]]) <= MAX_TOKENS < embedder.count_tokens([ANSWERS[3]])
    cos = (embedder.encode_query(short) * st_model.encode(short, normalize_embeddings=True)).sum(axis=1)
    assert cos.min() >= 0.999999, cos  # fp32 on ONNX Runtime, not the bf16 approximation


def test_bad_query_precision_is_one_clear_error():
    from slimlm.guard.embedder import Embedder

    with pytest.raises(SlimlmError, match="precision must be one of auto, onnx, bf16, fp32"):
        Embedder(query_precision="int8")
