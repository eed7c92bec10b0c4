"""Fallback arms per user, unknown stages, snap and deny decisions scored like sentence-transformers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from tests.guard.conftest import QUERY_SCORE_TOL, SHOP


def _expected_arm(user: str, arms: int) -> int:
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % arms


def test_arms_are_deterministic_per_user_and_both_are_used():
    from slimlm.guard.fallbacks import Fallbacks

    fb = Fallbacks.load(SHOP / "fallbacks.json")
    stages = json.loads((SHOP / "fallbacks.json").read_text())
    users = [f"user-{i}" for i in range(40)]
    arms = {u: fb.choose("checkout", u).arm for u in users}
    assert arms == {u: _expected_arm(u, 2) for u in users}
    assert set(arms.values()) == {0, 1}
    assert all(fb.choose("checkout", u).arm == arms[u] for u in users)  # same user, same arm
    c = fb.choose("after_sale", "alice")
    assert c.text == stages["after_sale"][c.arm] and c.stage == "after_sale" and not c.unknown_stage


def test_unknown_stage_gets_the_universal_fallback_and_says_so():
    from slimlm.guard.fallbacks import Fallbacks

    fb = Fallbacks.load(SHOP / "fallbacks.json")
    c = fb.choose("negotiation", "bob")
    assert c.stage == "default" and c.unknown_stage and c.requested_stage == "negotiation"
    assert c.text == json.loads((SHOP / "fallbacks.json").read_text())["default"][_expected_arm("bob", 2)]
    assert not fb.choose(None, "bob").unknown_stage  # no stage asked: the universal one, no note


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"greeting": ["hi"]}', "universal fallback 'default' is missing"),
        ('{"default": []}', "stage 'default' must be a non-empty list"),
        ('{"default": ["ok"], "x": [1]}', "stage 'x' must be a non-empty list of non-empty strings"),
        ("[1, 2]", "must be a JSON object"),
        ("{default: 1}", "is not valid JSON"),
    ],
)
def test_bad_fallback_files(tmp_path, content, message):
    from slimlm.guard.fallbacks import Fallbacks

    path = tmp_path / "fb.json"
    path.write_text(content)
    with pytest.raises(SlimlmError, match=message):
        Fallbacks.load(path)
    with pytest.raises(SlimlmError, match="does not exist"):
        Fallbacks.load(tmp_path / "missing.json")


def test_snap_decisions_match_sentence_transformers_cosine(shop_lib, embedder, st_model):
    from slimlm.guard.fallbacks import Fallbacks
    from slimlm.guard.library import Library
    from slimlm.guard.policy import Guard

    lib = Library(shop_lib)
    guard = Guard(lib, embedder, 0.6, Fallbacks.load(SHOP / "fallbacks.json"))
    answer = "Refunds go back to the card you paid with, usually 5-7 business days after your return arrives."
    d = guard.decide(answer, "after_sale", "carol")
    reply = lib.by_id["refund-time"]
    a, r = st_model.encode([answer, reply.text], normalize_embeddings=True)
    assert d.text == reply.text
    assert d.record["action"] == "matched" and d.record["id"] == "refund-time"
    # the guard embeds answers in bf16 where the CPU has it (vectors within cosine 0.9999 of encode's:
    # test_guard_query_fast.py), so scores agree to a few 1e-4
    assert d.record["score"] == pytest.approx(float(a @ r), abs=QUERY_SCORE_TOL)
    assert (d.record["stage"], d.record["arm"]) == ("after_sale", _expected_arm("carol", 2))

    off = guard.decide("The mitochondria is the powerhouse of the cell.", "greeting", "dave")
    stages = json.loads((SHOP / "fallbacks.json").read_text())
    assert off.record["action"] == "fallback" and off.record["reason"] == "below threshold"
    assert off.text == stages["greeting"][_expected_arm("dave", 2)]
    assert off.record["best_score"] < 0.6
    empty = guard.decide("   ", "checkout", "erin")
    assert empty.record["reason"] == "empty answer" and empty.text in stages["checkout"]
    lines = "\n".join(guard.metrics_lines())
    arm = _expected_arm("carol", 2)
    assert f'slimlm_guard_responses_total{{action="matched",stage="after_sale",arm="{arm}"}} 1' in lines
    assert "slimlm_guard_decisions_total 3" in lines


def test_deny_mode_blocks_answers_close_to_forbidden_examples(tmp_path, embedder, st_model):
    from slimlm.guard.fallbacks import Fallbacks
    from slimlm.guard.library import Library, build
    from slimlm.guard.policy import Guard

    forbidden = tmp_path / "forbidden.jsonl"
    rows = [
        {"id": "investment-advice", "text": "You should buy these stocks, they will definitely go up."},
        {"id": "medical-advice", "text": "You don't need a doctor, just take more of these pills."},
        {"id": "promise-discount", "text": "I can give you a 90% discount on everything right now."},
    ]
    forbidden.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build(forbidden, tmp_path / "deny", embedder)
    guard = Guard(
        Library(tmp_path / "deny"),
        embedder,
        0.55,
        Fallbacks.universal("I can't help with that."),
        mode="deny",
    )
    bad = "Sure, I'll give you ninety percent off all items today."
    fine = "Standard delivery takes 3 to 5 business days."
    b = guard.decide(bad, None, "u1")
    p = guard.decide(fine, None, "u1")
    ref = st_model.encode([bad, fine, *(r["text"] for r in rows)], normalize_embeddings=True)
    sims = ref[:2] @ ref[2:].T
    assert sims[0].max() >= 0.55 > sims[1].max()  # the reference agrees which one is forbidden
    assert b.text == "I can't help with that." and b.record["action"] == "blocked"
    assert b.record["id"] == rows[int(np.argmax(sims[0]))]["id"]
    assert p.text == fine and p.record["action"] == "passed"
    assert p.record["best_score"] == pytest.approx(float(sims[1].max()), abs=QUERY_SCORE_TOL)


def test_guard_rejects_bad_settings(shop_lib, embedder):
    from slimlm.guard.library import Library
    from slimlm.guard.policy import Guard

    with pytest.raises(SlimlmError, match="cosine similarity in \\[-1, 1\\]"):
        Guard(Library(shop_lib), embedder, 1.5)
    with pytest.raises(SlimlmError, match="--guard-mode"):
        Guard(Library(shop_lib), embedder, 0.5, mode="block")


class _CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed (a spy, not a stand-in)."""

    def __init__(self, real) -> None:
        self.real, self.texts = real, []
        self.dim = real.dim

    def __getattr__(self, name):
        return getattr(self.real, name)

    def encode_query(self, texts):
        self.texts += list(texts)
        return self.real.encode_query(texts)


def test_a_repeated_answer_reuses_its_vector_and_decides_the_same(shop_lib, embedder):
    from slimlm.guard.library import Library
    from slimlm.guard.policy import Guard

    spy = _CountingEmbedder(embedder)
    guard = Guard(Library(shop_lib), spy, 0.6, vector_cache=2)
    answers = ["Refunds usually take 5-7 business days.", "We ship to Canada and Mexico.", "Hello there!"]
    first = guard.decide(answers[0], None, "u")
    again = guard.decide(answers[0], None, "v")
    assert spy.texts == [answers[0]]  # embedded once
    assert (again.text, again.record["id"], again.record["score"]) == (
        first.text,
        first.record["id"],
        first.record["score"],
    )
    # a batch of choices: the known one comes from the cache, the two new ones are embedded together
    many = guard.decide_many(answers, None, "u")
    assert spy.texts == [answers[0], answers[1], answers[2]]
    assert many[0].record["score"] == first.record["score"]
    # the cache holds 2 answers: answers[0] (least recent) was dropped, so it is embedded again
    guard.decide(answers[0], None, "u")
    assert spy.texts[-1] == answers[0] and len(spy.texts) == 4
    assert "slimlm_guard_vector_cache_hits_total 2" in "\n".join(guard.metrics_lines())
    # off: every answer is embedded
    off = Guard(Library(shop_lib), spy, 0.6, vector_cache=0)
    off.decide(answers[1], None, "u")
    off.decide(answers[1], None, "u")
    assert spy.texts[-2:] == [answers[1], answers[1]]
    with pytest.raises(SlimlmError, match="--guard-cache is a number of answers"):
        Guard(Library(shop_lib), embedder, 0.6, vector_cache=-1)
