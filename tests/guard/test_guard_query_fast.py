"""The guard's per-response query path (`Embedder.encode_query`: one padded batch, inference_mode,
bf16 autocast on CPUs with native bf16) against sentence-transformers' own `encode`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from tests.guard.conftest import SHOP

# model answers of very different lengths (1 to ~130 tokens), several per call as with n > 1
ANSWERS = [
    "Yes.",
    "You can return unworn items with their tags within 30 days of delivery for a full refund.",
    " ".join(json.loads(line)["text"] for line in (SHOP / "replies.jsonl").read_text().splitlines()[:6]),
    "Unsere Lieferzeit beträgt drei bis fünf Werktage.",
]


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_query_vectors_equal_sentence_transformers_encode(embedder, st_model, precision):
    from slimlm.guard.embedder import Embedder

    e = embedder if precision == "auto" else Embedder(query_precision=precision)
    got = e.encode_query(ANSWERS)
    want = st_model.encode(ANSWERS, normalize_embeddings=True)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * want).sum(axis=1)
    assert cos.min() >= 0.9999, cos
    if precision == "fp32" or not e.query_bf16:
        assert cos.min() >= 0.999999, cos  # same arithmetic as encode, only batched differently


def test_bad_query_precision_is_one_clear_error():
    from slimlm.guard.embedder import Embedder

    with pytest.raises(SlimlmError, match="precision must be one of auto, bf16, fp32"):
        Embedder(query_precision="int8")
