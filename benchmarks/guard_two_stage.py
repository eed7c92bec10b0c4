"""Would a two-stage exact decision pay? A fast bf16 query vector (OpenVINO, bf16 inference precision on
this AVX512-BF16 CPU) decides when the decision is far from every boundary; the exact fp32 vector is
computed only for near-ties. Analysis only: nothing here is served.

The rule, for a served threshold T: with s1, s2 the fast scores of the best two distinct replies and m a
margin, the fast decision is kept when s1 - s2 > 2m and |s1 - T| > m. For unit vectors every score
moves by at most ||v_fast - v_exact|| (Cauchy-Schwarz), so the rule gives encode's decision whenever
||v_fast - v_exact|| <= m on an exact index. That distance is not known per answer without the exact
vector: m = `--safety` x the largest distance measured on a calibration set of answers disjoint from the
test sets, an empirical bound. Reported: decisions differing from encode's (all 27 thresholds of
calibrate's grid, on the same sets as `guard_bench.py --agreement`), the share of decisions that need
the exact vector, and (with --time) the fast path's latency.

    python benchmarks/guard_two_stage.py                                   # under /work/wt/bin/cpu
    /work/wt/bin/quiet python benchmarks/guard_two_stage.py --time         # adds the timing
Writes benchmarks/results/guard_two_stage.json. Needs `pip install openvino` (not a slimlm extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import guard_bench as gb  # noqa: E402


class OpenVinoQuery:
    """The cached ONNX export of the encoder compiled by OpenVINO for the CPU; pooling as in slimlm."""

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.names = [i.any_name for i in self.compiled.inputs]

    def embed(self, features) -> np.ndarray:
        feed = {n: np.ascontiguousarray(features[n].numpy(), dtype=np.int64) for n in self.names}
        hidden = self.request.infer(feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        v = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def far_from_boundaries(hits, threshold: float, margin: float) -> bool:
    """The fast decision stands: the best reply leads the second by over 2 margins, and is over one
    margin from the threshold (no hit at all: nothing to snap, a fallback either way)."""
    if not hits:
        return True
    s1 = hits[0].score
    s2 = hits[1].score if len(hits) > 1 else -1.0
    return s1 - s2 > 2 * margin and abs(s1 - threshold) > margin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--safety", type=float, default=2.0, help="margin = safety x the largest distance seen")
    ap.add_argument("--time", action="store_true", help="also time the fast path (run under quiet)")
    ap.add_argument("--out", default="benchmarks/results/guard_two_stage.json")
    args = ap.parse_args()
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("openvino is not installed: pip install openvino (nothing to analyse)", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from slimlm.guard.embedder import Embedder, cache_dir
    from slimlm.guard.onnx_query import _tokenize, cache_paths

    embedder = Embedder()
    embedder.prepare_query()
    exported, _ = cache_paths(embedder.path, cache_dir())
    fast = OpenVinoQuery(exported, "bf16", args.threads)

    def fast_vectors(texts):
        return np.vstack([fast.embed(_tokenize(embedder.model, [t])) for t in texts])

    # calibration answers, disjoint from the test sets (other seed; the shop's replies, not its answers)
    calib = [a for k in range(1, 15) for a in gb.answers_of_length(k, 20, seed=23)]
    calib += [json.loads(x)["text"] for x in (gb.SHOP / "replies.jsonl").read_text().splitlines()]
    dist = np.linalg.norm(fast_vectors(calib) - embedder.encode_unit(calib), axis=1)
    margin = args.safety * float(dist.max())
    out: dict = {
        "fast_path": "OpenVINO bf16 inference precision over the cached ONNX export",
        "calibration_answers": len(calib),
        "calibration_max_distance": round(float(dist.max()), 6),
        "calibration_median_distance": round(float(np.median(dist)), 6),
        "safety": args.safety,
        "margin": round(margin, 6),
        "sets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, lib, answers in gb.agreement_sets(embedder, tmp):
            exact = embedder.encode_unit(answers)
            vf = fast_vectors(answers)
            want = gb._decisions(lib, exact, gb.GRID)
            fast_only = gb._decisions(lib, vf, gb.GRID)
            hits = lib.search(vf, k=2)
            differing = fast_only_differing = needs_exact = 0
            for h, w, f in zip(hits, want, fast_only, strict=True):
                for t, wt, ft in zip(gb.GRID, w, f, strict=True):
                    fast_only_differing += ft != wt
                    if far_from_boundaries(h, t, margin):
                        differing += ft != wt
                    else:
                        needs_exact += 1  # the exact vector decides: encode's decision
            total = len(answers) * len(gb.GRID)
            d = np.linalg.norm(vf - exact, axis=1)
            at_06 = sum(not far_from_boundaries(h, 0.6, margin) for h in hits)
            out["sets"][name] = {
                "answers": len(answers),
                "decisions": total,
                "max_distance": round(float(d.max()), 6),
                "min_cosine_fast_vs_encode": round(float((vf * exact).sum(1).min()), 7),
                "fast_alone_decisions_differing": int(fast_only_differing),
                "two_stage_decisions_differing": int(differing),
                "two_stage_share_needing_exact": round(needs_exact / total, 4),
                "share_needing_exact_at_threshold_0.6": round(at_06 / len(answers), 4),
            }
            print(json.dumps({name: out["sets"][name]}, indent=1), file=sys.stderr)
    if args.time:
        out["fast_embed_ms_median"] = {}
        for k in gb.ANSWER_SENTENCES:
            feats = [_tokenize(embedder.model, [a]) for a in gb.answers_of_length(k, 50, seed=7)]
            for f in feats[:3]:
                fast.embed(f)
            times = []
            for i in range(100):
                t0 = time.perf_counter()
                fast.embed(feats[i % len(feats)])
                times.append(time.perf_counter() - t0)
            out["fast_embed_ms_median"][f"{k} sentences"] = round(statistics.median(times) * 1e3, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
