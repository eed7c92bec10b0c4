"""What the user receives instead of the model's raw answer, and a record of why.

snap mode: the answer is embedded, the library searched; the best approved reply is sent when its
cosine similarity is at least the threshold, else the stage's fallback (arm chosen per user).
deny mode: the library holds forbidden examples; an answer at least `threshold` similar to one of
them is replaced by the fallback, any other answer passes through unchanged.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.guard.fallbacks import FallbackChoice, Fallbacks
from slimlm.guard.library import Library

MODES = ("snap", "deny")
DEFAULT_FALLBACK = "I'm sorry, I can't help with that here. Please contact our support team."


@dataclass
class Decision:
    text: str
    record: dict


def _fallback_fields(choice: FallbackChoice) -> dict:
    out = {"stage": choice.stage, "arm": choice.arm}
    if choice.unknown_stage:
        out["requested_stage"] = choice.requested_stage
        out["note"] = f"unknown stage {choice.requested_stage!r}: the universal fallback was used"
    return out


class Guard:
    def __init__(
        self,
        library: Library,
        embedder,
        threshold: float,
        fallbacks: Fallbacks | None = None,
        mode: str = "snap",
    ) -> None:
        if mode not in MODES:
            raise SlimlmError(f"--guard-mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not -1.0 <= threshold <= 1.0:
            raise SlimlmError(f"--guard-threshold is a cosine similarity in [-1, 1], got {threshold}")
        library.check_embedder(embedder)
        self.library = library
        self.embedder = embedder
        self.threshold = float(threshold)
        self.fallbacks = fallbacks or Fallbacks.universal(DEFAULT_FALLBACK)
        self.mode = mode
        # (action, stage, arm) -> count, for /metrics; decisions run on worker threads
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.seconds = 0.0
        self._lock = threading.Lock()

    def decide_many(self, answers: list[str], stage: str | None, user: str | None) -> list[Decision]:
        start = time.perf_counter()
        choice = self.fallbacks.choose(stage, user)
        texts = [a if a.strip() else " " for a in answers]
        hits = self.library.search(self.embedder.encode_query(texts), k=1, stage=stage)
        out = [self._decide(a, h[0] if h else None, choice) for a, h in zip(answers, hits, strict=True)]
        elapsed = time.perf_counter() - start
        with self._lock:
            self.seconds += elapsed
            for d in out:
                self.counts[(d.record["action"], d.record["stage"], d.record["arm"])] += 1
        return out

    def decide(self, answer: str, stage: str | None = None, user: str | None = None) -> Decision:
        return self.decide_many([answer], stage, user)[0]

    def _decide(self, answer: str, hit, choice: FallbackChoice) -> Decision:
        fb = _fallback_fields(choice)
        score = round(hit.score, 6) if hit else None
        close = hit is not None and answer.strip() != "" and hit.score >= self.threshold
        if self.mode == "snap":
            if close:
                return Decision(
                    hit.reply.text, {"action": "matched", "id": hit.reply.id, "score": score, **fb}
                )
            reason = "empty answer" if not answer.strip() else "below threshold" if hit else "no reply found"
            record = {"action": "fallback", **fb, "reason": reason, "threshold": self.threshold}
            if hit:
                record.update(best_id=hit.reply.id, best_score=score)
            return Decision(choice.text, record)
        if close:
            record = {"action": "blocked", "id": hit.reply.id, "score": score, **fb}
            return Decision(choice.text, record)
        record = {"action": "passed", **fb}
        if hit:
            record.update(best_id=hit.reply.id, best_score=score)
        return Decision(answer, record)

    def metrics_lines(self) -> list[str]:
        with self._lock:
            counts = sorted(self.counts.items())
            seconds = self.seconds
            total = sum(self.counts.values())
        lines = [
            "# HELP slimlm_guard_responses_total Guarded answers by action (matched, fallback, blocked, passed), stage and arm.",
            "# TYPE slimlm_guard_responses_total counter",
        ]
        lines += [
            f'slimlm_guard_responses_total{{action="{a}",stage="{_label(s)}",arm="{arm}"}} {n}'
            for (a, s, arm), n in counts
        ]
        lines += [
            "# HELP slimlm_guard_seconds_total Seconds spent embedding and searching guarded answers.",
            "# TYPE slimlm_guard_seconds_total counter",
            f"slimlm_guard_seconds_total {seconds}",
            "# HELP slimlm_guard_decisions_total Guard decisions made (one per choice).",
            "# TYPE slimlm_guard_decisions_total counter",
            f"slimlm_guard_decisions_total {total}",
        ]
        return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def load_guard(
    library: str,
    threshold: float,
    fallbacks: str | None = None,
    mode: str = "snap",
    embedding_model: str | None = None,
    embedder=None,
) -> Guard:
    """Everything `slimlm serve --guard` needs, checked before the LLM loads (fail fast)."""
    from slimlm.guard.embedder import Embedder

    if mode not in MODES:
        raise SlimlmError(f"--guard-mode must be one of {', '.join(MODES)}, got {mode!r}")
    fb = Fallbacks.load(fallbacks) if fallbacks else None
    lib = Library(library)
    embedder = embedder or Embedder(embedding_model)
    if hasattr(embedder, "prepare_query"):
        embedder.prepare_query()  # the ONNX query path's one-time export: at startup, not on a response
    return Guard(lib, embedder, threshold, fb, mode)
