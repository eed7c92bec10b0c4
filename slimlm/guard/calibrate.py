"""Choose the snap threshold from labeled answers: precision, recall and fallback rate per threshold.

labeled.jsonl: {"answer": "a model answer", "expected": "reply-id"} or {"expected": "fallback"} for
answers that must not snap to anything. At threshold t an answer snaps to its best reply when the
score is >= t, else falls back. precision: snapped answers that snapped to the expected reply (a
snap of a "fallback" answer is wrong); recall: answers with an expected reply that snapped to it;
fallback rate: answers that fell back. The recommendation is the lowest threshold whose precision
reaches the target (most answers served while staying correct), else the threshold of best F1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

FALLBACK = "fallback"


@dataclass
class Row:
    threshold: float
    precision: float
    recall: float
    fallback_rate: float
    accuracy: float  # right reply or rightly fell back
    f1: float


def read_labeled(path: str | Path, known_ids: set[str]) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"labeled file {p} does not exist")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimlmError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("answer"), str)
                or not obj["answer"].strip()
            ):
                raise SlimlmError(f"{p}:{n}: each line needs a non-empty 'answer' string and 'expected'")
            expected = obj.get("expected")
            if isinstance(expected, int) and not isinstance(expected, bool):
                expected = str(expected)
            if not isinstance(expected, str) or (expected != FALLBACK and expected not in known_ids):
                raise SlimlmError(
                    f"{p}:{n}: 'expected' must be a reply id of the library or \"{FALLBACK}\", got {expected!r}"
                )
            out.append((obj["answer"], expected))
    if not out:
        raise SlimlmError(f"labeled file {p} has no lines")
    return out


def sweep(
    best_ids: list[str], best_scores: np.ndarray, expected: list[str], thresholds: np.ndarray
) -> list[Row]:
    ids = np.array(best_ids, dtype=object)
    exp = np.array(expected, dtype=object)
    right_reply = ids == exp
    wants_reply = exp != FALLBACK
    rows = []
    for t in thresholds:
        snapped = best_scores >= t
        n_snap = int(snapped.sum())
        correct_snaps = int((snapped & right_reply).sum())
        precision = correct_snaps / n_snap if n_snap else 1.0
        recall = correct_snaps / int(wants_reply.sum()) if wants_reply.any() else 1.0
        accuracy = (correct_snaps + int((~snapped & ~wants_reply).sum())) / len(exp)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(Row(round(float(t), 4), precision, recall, 1 - n_snap / len(exp), accuracy, f1))
    return rows


def recommend(rows: list[Row], target_precision: float) -> tuple[Row, str]:
    ok = [r for r in rows if r.precision >= target_precision and r.fallback_rate < 1.0]
    if ok:
        best = min(ok, key=lambda r: r.threshold)
        return best, f"lowest threshold with precision >= {target_precision:g}"
    best = max(rows, key=lambda r: (r.f1, -r.threshold))
    return best, f"no threshold reaches precision {target_precision:g}; best F1"


def calibrate(guard_library, embedder, labeled_path, thresholds: np.ndarray, target_precision: float = 0.95):
    pairs = read_labeled(labeled_path, set(guard_library.by_id))
    vectors = embedder.encode_unit([a for a, _ in pairs])
    hits = guard_library.search(vectors, k=1)
    best_ids = [h[0].reply.id if h else "" for h in hits]
    scores = np.array([h[0].score if h else -2.0 for h in hits], dtype=np.float64)
    rows = sweep(best_ids, scores, [e for _, e in pairs], thresholds)
    best, why = recommend(rows, target_precision)
    return rows, best, why, len(pairs)


def plot(rows: list[Row], best: Row, path: str | Path, title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SlimlmError(
            "the calibration plot needs matplotlib: pip install 'slimlm[plot]' (or pass --no-plot)"
        ) from None
    t = [r.threshold for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(t, [r.precision for r in rows], label="precision")
    ax.plot(t, [r.recall for r in rows], label="recall")
    ax.plot(t, [r.fallback_rate for r in rows], label="fallback rate")
    ax.axvline(best.threshold, color="grey", linestyle="--", label=f"recommended {best.threshold:g}")
    ax.set_xlabel("threshold (cosine similarity)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
