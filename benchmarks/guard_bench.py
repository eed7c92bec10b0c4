"""Guard latency and the vector-index choice: embedding + search per response at 10k and 100k replies.

Replies are synthetic support sentences (products x topics x details, all distinct) embedded with the
default model (all-MiniLM-L6-v2); the embeddings are cached under ~/.cache/slimlm/guard_bench so a
rerun only measures. For each library size it builds faiss exact (IndexFlatIP), faiss HNSW and
hnswlib HNSW over the same vectors and reports build time, single-query search latency (median,
p95), and recall@1 / recall@10 against the exact scan; then the per-response cost slimlm's guard
pays: embed one model answer + search the chosen index (`Guard.decide`, everything included).

    nice python benchmarks/guard_bench.py                 # 10k and 100k
    nice python benchmarks/guard_bench.py --sizes 10000   # quick
Writes benchmarks/results/guard_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRODUCTS = [
    "hiking boots",
    "trail runners",
    "rain jacket",
    "down parka",
    "fleece",
    "base layer",
    "backpack",
    "daypack",
    "tent",
    "sleeping bag",
    "sleeping pad",
    "trekking poles",
    "headlamp",
    "water filter",
    "camp stove",
    "cooking set",
    "insulated bottle",
    "gloves",
    "beanie",
    "wool socks",
    "sun hat",
    "climbing harness",
    "chalk bag",
    "helmet",
    "ski jacket",
    "snow pants",
    "gaiters",
    "hammock",
    "camp chair",
    "duffel bag",
    "travel pack",
    "softshell",
    "vest",
    "shorts",
    "hiking pants",
    "sandals",
    "approach shoes",
    "mittens",
    "neck gaiter",
    "compass",
    "first aid kit",
    "bivy",
    "tarp",
    "lantern",
    "cooler",
    "kayak paddle",
    "life vest",
    "dry bag",
    "bike shorts",
    "cycling jersey",
]
TOPICS = [
    "can be returned within 30 days",
    "ships in 3 to 5 business days",
    "is covered by our lifetime warranty",
    "is back in stock next week",
    "runs half a size small",
    "is machine washable on a gentle cycle",
    "qualifies for free shipping over $50",
    "can be repaired at our service center",
    "is made of recycled materials",
    "is on sale this weekend",
    "can be exchanged for another size",
    "comes in four colors",
    "is waterproof up to 20,000 mm",
    "weighs under one kilogram",
    "is eligible for the student discount",
    "can be paid in four installments",
    "ships to Canada and the EU",
    "has a gift receipt option",
    "is excluded from promo codes",
    "can be picked up in store",
    "is rated for temperatures down to -10 C",
    "has reflective details for night use",
    "is packed in plastic-free packaging",
    "includes a stuff sack",
    "is compatible with our spare parts kit",
    "was redesigned this season",
    "fits carry-on size limits",
    "has a two-year battery guarantee",
    "must be returned unused",
    "is sold out in size medium",
]
DETAILS = [
    "according to our current policy",
    "for members of the Trail Club",
    "unless it was bought on final sale",
    "as listed on the product page",
    "when ordered before 2 pm",
    "if you keep the original tags",
    "in all our US stores",
    "for orders placed online",
    "within the continental US",
    "after the order is confirmed",
    "once the payment clears",
    "with the prepaid label in your account",
    "while supplies last",
    "as confirmed by our support team",
    "for the current season's models",
    "with proof of purchase",
    "on request through the help center",
    "during the holiday period",
    "for first-time customers",
    "subject to inspection",
    "in the size you ordered",
    "at no extra cost",
    "for a small fee",
    "by our partner carrier",
    "from the regional warehouse",
    "except for custom orders",
    "for orders above $100",
    "through our mobile app",
    "when you sign in",
    "with the newsletter code",
]
OPENERS = [
    "",
    "Good news: ",
    "Yes, ",
    "Please note that ",
    "Just so you know, ",
    "Sure! ",
    "Thanks for asking: ",
]


REPEATS, BUILD_THREADS, THREADS = 100, 2, 1


def _build_threads(on: bool) -> None:
    """faiss builds in parallel; single-query search runs on one thread (see docs/guard.md)."""
    import faiss

    faiss.omp_set_num_threads(BUILD_THREADS if on else THREADS)


def synthetic(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        s = f"{rng.choice(OPENERS)}the {rng.choice(PRODUCTS)} {rng.choice(TOPICS)} {rng.choice(DETAILS)}."
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def cached_vectors(embedder, n: int, seed: int) -> np.ndarray:
    """Real embeddings of synthetic(n, seed), computed once and cached."""
    cache = Path(os.path.expanduser("~/.cache/slimlm/guard_bench"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{embedder.model_id}-{n}-{seed}.npy"
    if path.exists():
        return np.load(path)
    t0 = time.perf_counter()
    vectors = embedder.encode_unit(synthetic(n, seed), batch_size=128)
    print(f"embedded {n} replies in {time.perf_counter() - t0:.1f} s (cached at {path})", file=sys.stderr)
    np.save(path, vectors)
    return vectors


def library_vectors(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n unit vectors: the real ones first, then mixtures of two real ones plus a little noise.

    Embedding 100k texts takes longer than this shared 2-core machine allows, so sizes above the
    embedded base are filled with points inside the real vectors' region (said in docs/guard.md).
    """
    if n <= len(base):
        return base[:n]
    rng = np.random.default_rng(seed)
    extra = n - len(base)
    i, j = rng.integers(0, len(base), extra), rng.integers(0, len(base), extra)
    w = rng.uniform(0.55, 0.85, (extra, 1)).astype(np.float32)
    mixed = (
        w * base[i]
        + (1 - w) * base[j]
        + 0.02 * rng.standard_normal((extra, base.shape[1])).astype(np.float32)
    )
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return np.vstack([base, mixed]).astype(np.float32)


def timed(fn, repeats: int) -> dict:
    """Wall time and the process's CPU time per call (CPU time is what an idle machine's wall time
    would be at one thread; on this shared machine the wall time also holds waiting for a core)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    wall.sort()
    return {
        "median_ms": round(statistics.median(wall) * 1e3, 3),
        "p95_ms": round(wall[int(0.95 * (len(wall) - 1))] * 1e3, 3),
        "cpu_median_ms": round(statistics.median(cpu) * 1e3, 3),
    }


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k]) & set(e[:k])) for f, e in zip(found, exact, strict=True))
    return round(hits / (k * len(exact)), 4)


def compare_indexes(vectors: np.ndarray, queries: np.ndarray) -> dict:
    from slimlm.guard import index as vindex

    out = {}
    _build_threads(True)
    t0 = time.perf_counter()
    flat = vindex.build_index(vectors, "flat")
    out["faiss_flat"] = {"build_s": round(time.perf_counter() - t0, 3)}
    exact = flat.search(queries, 10)[1]
    t0 = time.perf_counter()
    hnsw = vindex.build_index(vectors, "hnsw")
    out["faiss_hnsw"] = {"build_s": round(time.perf_counter() - t0, 3)}
    searchers = {"faiss_flat": lambda q: flat.search(q, 10)[1], "faiss_hnsw": lambda q: hnsw.search(q, 10)[1]}
    try:
        import hnswlib
    except ImportError:
        print("hnswlib is not installed: skipping that peer (pip install hnswlib)", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        hl = hnswlib.Index(space="ip", dim=vectors.shape[1])
        hl.init_index(max_elements=len(vectors), M=vindex.HNSW_M, ef_construction=vindex.HNSW_EF_CONSTRUCTION)
        hl.add_items(vectors, num_threads=BUILD_THREADS)
        hl.set_ef(vindex.HNSW_EF_SEARCH)
        out["hnswlib"] = {"build_s": round(time.perf_counter() - t0, 3)}
        searchers["hnswlib"] = lambda q: hl.knn_query(q, k=10, num_threads=THREADS)[0]
    _build_threads(False)
    for name, fn in searchers.items():
        found = np.vstack([fn(queries[i : i + 1]) for i in range(len(queries))])
        out[name]["recall@1"] = recall(found, exact, 1)
        out[name]["recall@10"] = recall(found, exact, 10)
        out[name]["query"] = timed(
            lambda fn=fn: fn(queries[np.random.randint(len(queries))][None, :]), REPEATS
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200, help="answers searched per size")
    ap.add_argument(
        "--embedded", type=int, default=10_000, help="replies really embedded (larger sizes: mixtures)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch and faiss threads for one response (default 1)"
    )
    ap.add_argument("--build-threads", type=int, default=2, help="faiss threads while building indexes")
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per measurement")
    ap.add_argument("--out", default="benchmarks/results/guard_bench.json")
    args = ap.parse_args()

    import faiss
    import torch

    random.seed(0)
    np.random.seed(0)

    global REPEATS, BUILD_THREADS, THREADS
    REPEATS, BUILD_THREADS, THREADS = args.repeats, args.build_threads, args.threads
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from slimlm.guard.embedder import Embedder
    from slimlm.guard.fallbacks import Fallbacks
    from slimlm.guard.library import Library, _sha1, build
    from slimlm.guard.policy import Guard

    embedder = Embedder()
    answers = [f"Model answer: {s}" for s in synthetic(args.queries, seed=7)]
    queries = embedder.encode_unit(answers)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average_at_start": os.getloadavg()[0],
        "threads": args.threads,
        "build_threads": args.build_threads,
        "model": embedder.model_id,
        "embedded_base": args.embedded,
        "sizes": {},
    }
    # embedding one answer alone: what every guarded response pays once
    results["embed_one_answer"] = timed(lambda: embedder.encode_unit([random.choice(answers)]), REPEATS)
    base = cached_vectors(embedder, args.embedded, seed=1)
    for n in args.sizes:
        texts = synthetic(n, seed=1)  # the first args.embedded of them are the embedded base
        vectors = library_vectors(base, n, seed=2)
        entry = {"real_vectors": min(n, len(base)), "indexes": compare_indexes(vectors, queries)}
        with tempfile.TemporaryDirectory() as tmp:
            replies, lib_dir = Path(tmp) / "replies.jsonl", Path(tmp) / "lib"
            replies.write_text(
                "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts))
            )
            # an existing library holding these vectors: `build` reuses them instead of embedding
            lib_dir.mkdir()
            np.save(lib_dir / "vectors.npy", vectors)
            np.save(lib_dir / "hashes.npy", _sha1(texts))
            (lib_dir / "library.json").write_text(
                json.dumps({"model": embedder.model_id, "dim": embedder.dim})
            )
            _build_threads(True)
            t0 = time.perf_counter()
            report = build(replies, lib_dir, embedder)
            entry["rebuild_all_reused_s"] = round(time.perf_counter() - t0, 3)
            entry["index_kind"] = report.index
            lines = replies.read_text().splitlines()
            for k in range(10):  # an edit: ten replies reworded
                lines[k * 7] = json.dumps(
                    {"id": f"r{k * 7}", "text": f"Edited reply {k}: call us for the details."}
                )
            replies.write_text("\n".join(lines) + "\n")
            t0 = time.perf_counter()
            report = build(replies, lib_dir, embedder)
            entry["rebuild_after_10_edits_s"] = round(time.perf_counter() - t0, 3)
            entry["rebuild_embedded"] = report.embedded
            with replies.open("a") as f:  # appending replies: the old index is extended
                f.writelines(
                    json.dumps({"id": f"new{k}", "text": f"New reply {k}: ask in store."}) + "\n"
                    for k in range(10)
                )
            t0 = time.perf_counter()
            report = build(replies, lib_dir, embedder)
            entry["rebuild_after_10_appends_s"] = round(time.perf_counter() - t0, 3)
            entry["append_extended_index"] = report.index_extended
            _build_threads(False)
            guard = Guard(Library(lib_dir), embedder, 0.6, Fallbacks.universal("fallback"))
            entry["guard_decide"] = timed(
                lambda g=guard: g.decide(random.choice(answers), None, "u"), REPEATS
            )
            entry["library_bytes"] = sum(p.stat().st_size for p in lib_dir.iterdir())
        results["sizes"][str(n)] = entry
        print(json.dumps({n: entry}, indent=1), file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
