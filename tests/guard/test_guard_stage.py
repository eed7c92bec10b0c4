"""A reply's `stage` restricts where it can match: replies of that stage and replies without one
match in a stage; a request without a stage searches every reply. Reference: brute-force cosine
over sentence-transformers' own vectors of the allowed texts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.guard.conftest import SHOP

ANSWERS = [
    "You can send unworn things back within a month for your money back.",
    "Shipping is free once your order is above fifty dollars.",
    "Hi there, welcome! How can I help?",
    "If you forgot your password, use the reset link on the sign-in page.",
]


def _reference(st_model, answer: str, stage: str | None) -> tuple[str, float]:
    texts, owners = [], []
    for line in (SHOP / "replies.jsonl").read_text().splitlines():
        r = json.loads(line)
        if stage is None or r.get("stage") in (None, stage):
            for t in [r["text"], *r.get("examples", [])]:
                texts.append(t)
                owners.append(r["id"])
    v = st_model.encode([answer, *texts], normalize_embeddings=True)
    sims = v[1:] @ v[0]
    return owners[int(np.argmax(sims))], float(sims.max())


@pytest.fixture(scope="module", params=["flat", "hnsw"])
def lib(request, tmp_path_factory, embedder):
    from slimlm.guard.library import Library, build

    out = tmp_path_factory.mktemp("stage") / request.param
    build(SHOP / "replies.jsonl", out, embedder, kind=request.param)
    return Library(out)


@pytest.mark.parametrize("stage", [None, "greeting", "checkout", "after_sale", "no-such-stage"])
def test_stage_restricts_matches_to_its_replies_and_stageless_ones(lib, embedder, st_model, stage):
    stages = {r.id: r.stage for r in lib.replies}
    hits = lib.search(embedder.encode_unit(ANSWERS), k=3, stage=stage)
    for answer, found in zip(ANSWERS, hits, strict=True):
        want_id, want_score = _reference(st_model, answer, stage)
        assert found[0].reply.id == want_id
        assert found[0].score == pytest.approx(want_score, abs=1e-5)
        if stage is not None:
            assert all(stages[h.reply.id] in (None, stage) for h in found)


def test_a_staged_reply_matches_only_in_its_stage(lib, embedder):
    from slimlm.guard.fallbacks import Fallbacks
    from slimlm.guard.policy import Guard

    guard = Guard(lib, embedder, 0.6, Fallbacks.load(SHOP / "fallbacks.json"))
    answer = "Standard shipping is free on orders over $50."
    assert lib.by_id["shipping-cost"].stage == "checkout"
    inside = guard.decide(answer, "checkout", "u")
    assert inside.record["action"] == "matched" and inside.record["id"] == "shipping-cost"
    assert guard.decide(answer, None, "u").record["id"] == "shipping-cost"  # no stage: every reply
    outside = guard.decide(answer, "greeting", "u")  # greeting's replies and stage-less ones only
    assert outside.record.get("id", outside.record.get("best_id")) != "shipping-cost"
