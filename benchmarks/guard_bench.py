"""Guard latency and the vector-index choice: embedding + search per response at 10k and 100k replies.

Replies are synthetic support sentences (openers x products x topics x details, all distinct texts)
embedded with the default model (all-MiniLM-L6-v2); every library vector is a real embedding of its
text (computed once in 10k chunks and cached under ~/.cache/slimlm/guard_bench, so a rerun only
measures). For each library size it builds faiss exact (IndexFlatIP), faiss HNSW and hnswlib HNSW
over the same vectors and reports build time, single-query search latency (median, p95), and
recall@1 / recall@10 against the exact scan; rebuild costs; then the per-response cost slimlm's guard
pays: embed one model answer + search the chosen index (`Guard.decide`, everything included), for
answers of 1, 3, 7 and 14 sentences (~20 / 55 / 125 / 245 tokens), with 2 threads, comparing the
query paths (ONNX Runtime fp32 on the transformer-optimized graph and on the plain export, PyTorch fp32
and bf16 autocast, sentence-transformers' fp32 `encode`).
`--agreement` instead checks that the served query path snaps like `encode` (no timing).

    /work/wt/bin/quiet python benchmarks/guard_bench.py --latency-only --out benchmarks/results/guard_latency.json
    python benchmarks/guard_bench.py --sizes 10000                       # everything, 10k only
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
from concurrent.futures import ThreadPoolExecutor
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
# answers of 1, 3, 7 and 14 support sentences: about 20, 55, 125 and 245 tokens
ANSWER_SENTENCES = (1, 3, 7, 14)


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
    """Real embeddings of synthetic(n, seed), computed once in chunks of 10k and cached (a 100k
    library takes about 10 minutes to embed on 2 idle cores; rerun to resume an interrupted one)."""
    cache = Path(os.path.expanduser("~/.cache/slimlm/guard_bench"))
    cache.mkdir(parents=True, exist_ok=True)
    chunk = 10_000
    texts = synthetic(-(-n // chunk) * chunk, seed)
    parts = []
    for start in range(0, len(texts), chunk):
        path = cache / f"{embedder.model_id}-chunk{start}-{seed}.npy"
        if not path.exists():
            t0 = time.perf_counter()
            np.save(path, embedder.encode_unit(texts[start : start + chunk], batch_size=128))
            print(
                f"embedded replies {start}..{start + chunk} in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
        parts.append(np.load(path))
    return np.vstack(parts)[:n]


def answers_of_length(sentences: int, count: int, seed: int) -> list[str]:
    """Model-like answers: `sentences` support sentences joined (1: ~20 tokens, 3: ~60, 6: ~125)."""
    pool = synthetic(count * sentences, seed)
    return [" ".join(pool[i * sentences : (i + 1) * sentences]) for i in range(count)]


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


def rebuilds(replies: Path, lib_dir: Path, embedder, entry: dict) -> None:
    from slimlm.guard.library import build

    lines = replies.read_text().splitlines()
    for k in range(10):  # an edit: ten replies reworded
        lines[k * 7] = json.dumps({"id": f"r{k * 7}", "text": f"Edited reply {k}: call us for the details."})
    replies.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    report = build(replies, lib_dir, embedder)
    entry["rebuild_after_10_edits_s"] = round(time.perf_counter() - t0, 3)
    entry["rebuild_embedded"] = report.embedded
    with replies.open("a") as f:  # appending replies: the old index is extended
        f.writelines(
            json.dumps({"id": f"new{k}", "text": f"New reply {k}: ask in store."}) + "\n" for k in range(10)
        )
    t0 = time.perf_counter()
    report = build(replies, lib_dir, embedder)
    entry["rebuild_after_10_appends_s"] = round(time.perf_counter() - t0, 3)
    entry["append_extended_index"] = report.index_extended


def _decisions(lib, vectors: np.ndarray, thresholds: np.ndarray) -> list[tuple]:
    """Per answer and threshold what the guard sends: the top reply's id, or a fallback."""
    hits = lib.search(vectors, k=1)
    out = []
    for h in hits:
        best = h[0] if h else None
        out.append(tuple(best.reply.id if best and best.score >= t else "fallback" for t in thresholds))
    return out


SHOP = Path(__file__).resolve().parents[1] / "examples" / "guard_shop"
# calibrate's threshold grid
GRID = np.round(np.arange(0.3, 0.95 + 1e-9, 0.025), 3)


def agreement_sets(embedder, tmp: str) -> list[tuple]:
    """(name, library, answers): the shop's labeled answers (the calibrate set) against the shop
    library, and 700 synthetic answers of 1 to 14 sentences against the 10k library."""
    from slimlm.guard.library import Library, _sha1, build

    labeled = [json.loads(x)["answer"] for x in (SHOP / "labeled.jsonl").read_text().splitlines()]
    synthetic_answers = [a for k in range(1, 15) for a in answers_of_length(k, 50, seed=11)]
    build(SHOP / "replies.jsonl", Path(tmp) / "shop", embedder)
    texts = synthetic(10_000, seed=1)
    big = Path(tmp) / "big"
    big.mkdir()
    np.save(big / "vectors.npy", cached_vectors(embedder, 10_000, seed=1))
    np.save(big / "hashes.npy", _sha1(texts))
    (big / "library.json").write_text(json.dumps({"model": embedder.model_id, "dim": embedder.dim}))
    replies = Path(tmp) / "replies.jsonl"
    replies.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    build(replies, big, embedder)
    return [
        ("shop labeled answers", Library(Path(tmp) / "shop"), labeled),
        ("synthetic answers vs 10k library", Library(big), synthetic_answers),
    ]


def agreement(embedder, out: dict) -> None:
    """Does the served query path snap like sentence-transformers' fp32 `encode`? On the shop's
    labeled answers (the calibrate set) and on 700 synthetic answers of 1 to 14 sentences against
    the 10k library, at every threshold of calibrate's grid: same reply or same fallback."""
    from slimlm.guard.embedder import Embedder

    paths = {
        "auto (served)": embedder,
        "onnxruntime fp32, plain graph": Embedder(onnx_optimize=False),
        "torch bf16 autocast": Embedder(query_precision="bf16"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, lib, answers in agreement_sets(embedder, tmp):
            ref = embedder.encode_unit(answers)
            want = _decisions(lib, ref, GRID)
            tokens = [embedder.count_tokens([a]) for a in answers]
            entry = {
                "answers": len(answers),
                "tokens_min_max": [min(tokens), max(tokens)],
                "thresholds": len(GRID),
            }
            for name, e in paths.items():
                got_v = np.vstack([e.encode_query([a]) for a in answers])
                got = _decisions(lib, got_v, GRID)
                diff = sum(
                    g != w for gs, ws in zip(got, want, strict=True) for g, w in zip(gs, ws, strict=True)
                )
                entry[name] = {
                    "query_path": e.query_path,
                    "min_cosine_vs_encode": round(float((got_v * ref).sum(1).min()), 7),
                    "decisions_differing": diff,
                    "decisions": len(answers) * len(GRID),
                }
            out[set_name] = entry
            print(json.dumps({set_name: entry}, indent=1), file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200, help="answers searched per size")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads for one response (default 2: what `slimlm serve --threads 2` gives it)",
    )
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only the per-response guard latency (no index comparison, no rebuilds)",
    )
    ap.add_argument(
        "--agreement",
        action="store_true",
        help="only check that the served query path snaps like encode (no timing; run under cpu)",
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
    embedder.prepare_query()
    if args.agreement:
        found: dict = {"model": embedder.model_id, "query_path": embedder.query_path}
        agreement(embedder, found)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(found, indent=1) + "\n")
        return 0
    answers = [f"Model answer: {s}" for s in synthetic(args.queries, seed=7)]
    queries = embedder.encode_unit(answers)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average_at_start": os.getloadavg()[0],
        "threads": args.threads,
        "build_threads": args.build_threads,
        "model": embedder.model_id,
        "query_bf16": embedder.query_bf16,
        "sizes": {},
    }
    # the server runs Guard.decide on the engine's thread (the main thread, between decode steps);
    # with --replicas in the Ray ingress, on a worker thread (asyncio.to_thread): measured too
    pool = ThreadPoolExecutor(1)
    by_length = {f"{k} sentences": answers_of_length(k, 50, seed=7) for k in ANSWER_SENTENCES}
    results["answer_tokens_median"] = {
        k: int(statistics.median(embedder.count_tokens([a]) for a in v)) for k, v in by_length.items()
    }
    embedder.prepare_query()
    results["query_path"] = embedder.query_path
    # auto is ONNX Runtime fp32 on the optimized graph when onnxruntime is installed (query_path above)
    plain = Embedder(onnx_optimize=False)
    plain.prepare_query()
    paths = {
        "auto (served)": embedder,
        "onnxruntime fp32, plain graph": plain,
        "torch fp32 modules": Embedder(query_precision="fp32"),
        "torch bf16 autocast": Embedder(query_precision="bf16"),
    }
    results["embed_one_answer"] = {}
    for name, e in paths.items():
        results["embed_one_answer"][name] = {
            k: timed(lambda e=e, v=v: e.encode_query([random.choice(v)]), REPEATS)
            for k, v in by_length.items()
        }
    results["embed_one_answer"]["fp32 encode (sentence-transformers)"] = {
        k: timed(lambda v=v: embedder.encode_unit([random.choice(v)]), REPEATS) for k, v in by_length.items()
    }
    results["embed_one_answer"]["auto, on a worker thread"] = {
        k: timed(lambda v=v: pool.submit(embedder.encode_query, [random.choice(v)]).result(), REPEATS)
        for k, v in by_length.items()
    }
    del paths
    for n in args.sizes:
        texts = synthetic(n, seed=1)
        vectors = cached_vectors(embedder, n, seed=1)
        entry = {"real_vectors": n}
        if not args.latency_only:
            entry["indexes"] = compare_indexes(vectors, queries)
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
            if not args.latency_only:
                rebuilds(replies, lib_dir, embedder, entry)
            _build_threads(False)
            guard = Guard(Library(lib_dir), embedder, 0.6, Fallbacks.universal("fallback"))
            entry["guard_decide"] = {
                k: timed(lambda g=guard, v=v: g.decide(random.choice(v), None, "u"), REPEATS)
                for k, v in by_length.items()
            }
            entry["search_only"] = timed(
                lambda q=queries, g=guard: g.library.search(q[np.random.randint(len(q))][None, :], k=1),
                REPEATS,
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
