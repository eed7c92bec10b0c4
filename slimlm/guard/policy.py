"""What the user receives instead of the model's raw answer, and a record of why.

snap mode: the answer is embedded, the library searched; the best approved reply is sent when its
cosine similarity is at least the threshold, else the stage's fallback (arm chosen per user).
deny mode: the library holds forbidden examples; an answer at least `threshold` similar to one of
them is replaced by the fallback, any other answer passes through unchanged.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.guard.fallbacks import FallbackChoice, Fallbacks
from slimlm.guard.library import Library

MODES = ("snap", "deny")
DEFAULT_FALLBACK = "I'm sorry, I can't help with that here. Please contact our support team."
# Answers seen lately keep their vectors (384 floats: 1.5 KiB each, so 6 MiB at most by default). A
# model answering the same question the same way (greedy decoding, FAQ traffic) then pays the search
# alone. Exact: a vector depends on the answer's text only; the search still runs every time, so a
# rebuilt library is seen at once.
DEFAULT_VECTOR_CACHE = 4096


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
        vector_cache: int = DEFAULT_VECTOR_CACHE,
    ) -> None:
        if vector_cache < 0:
            raise SlimlmError(f"--guard-cache is a number of answers (0 turns it off), got {vector_cache}")
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
        self.vector_cache = int(vector_cache)
        self._vectors: OrderedDict[str, object] = OrderedDict()
        self.cache_hits = 0

    def _vectors_for(self, texts: list[str]):
        """Unit vectors of `texts`: remembered ones from the cache, the rest embedded in one call."""
        import numpy as np

        with self._lock:
            found = [self._vectors.get(t) for t in texts]
            for t, v in zip(texts, found, strict=True):
                if v is not None:
                    self._vectors.move_to_end(t)
            self.cache_hits += sum(v is not None for v in found)
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            fresh = self.embedder.encode_query([texts[i] for i in missing])
            for i, row in zip(missing, fresh, strict=True):
                found[i] = row
            if self.vector_cache:
                with self._lock:
                    for i, row in zip(missing, fresh, strict=True):
                        self._vectors[texts[i]] = row.copy()
                    while len(self._vectors) > self.vector_cache:
                        self._vectors.popitem(last=False)
        return np.stack(found)

    def decide_many(self, answers: list[str], stage: str | None, user: str | None) -> list[Decision]:
        start = time.perf_counter()
        choice = self.fallbacks.choose(stage, user)
        texts = [a if a.strip() else " " for a in answers]
        hits = self.library.search(self._vectors_for(texts), k=1, stage=stage)
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
            cache_hits = self.cache_hits
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
            "# HELP slimlm_guard_vector_cache_hits_total Answers whose vector came from the cache (seen lately).",
            "# TYPE slimlm_guard_vector_cache_hits_total counter",
            f"slimlm_guard_vector_cache_hits_total {cache_hits}",
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
    vector_cache: int = DEFAULT_VECTOR_CACHE,
) -> Guard:
    """Everything `slimlm serve --guard` needs, checked before the LLM loads (fail fast)."""
    from slimlm.guard.embedder import Embedder

    if mode not in MODES:
        raise SlimlmError(f"--guard-mode must be one of {', '.join(MODES)}, got {mode!r}")
    if vector_cache < 0:
        raise SlimlmError(f"--guard-cache is a number of answers (0 turns it off), got {vector_cache}")
    fb = Fallbacks.load(fallbacks) if fallbacks else None
    lib = Library(library)
    embedder = embedder or Embedder(embedding_model)
    if hasattr(embedder, "prepare_query"):
        embedder.prepare_query()  # the ONNX query path's one-time export: at startup, not on a response
    return Guard(lib, embedder, threshold, fb, mode, vector_cache)
