"""Ray Serve replicas vs one plain `slimlm serve`, same 2 CPU threads in total, same run.

Three servers run one after the other, each as its own `slimlm serve` process:

  plain       slimlm serve --threads 2                       (one engine, no Ray)
  ray-1x2     slimlm serve --replicas 1 --threads 2          (one replica behind Ray Serve: Ray's overhead)
  ray-2x1     slimlm serve --replicas 2 --threads 1          (two replicas, prefix-affinity routing)

Each gets a warm-up request, then `--rounds` rounds of `--clients` concurrent streaming clients (unique
prompts, `--max-tokens` forced output tokens via ignore_eos); the report gives per server the median
over rounds of output tokens/s and TTFT p50/p90, and the ratios to `plain`.

    python benchmarks/cluster_bench.py                         # 32 clients x 32 tokens, 3 rounds
    python benchmarks/cluster_bench.py --clients 8 --rounds 1  # quick look

Results go to benchmarks/results/cluster_bench.json. Ray starts a local instance with 2 CPUs inside the
replica runs (`ray` from the `cluster` extra); the machine's other jobs share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import REPO, Server, _free_port, run_level  # noqa: E402

CONFIGS = {"plain": (None, 2), "ray-1x2": (1, 2), "ray-2x1": (2, 1)}


class GracefulServer(Server):
    """Stops with Ctrl-C (SIGINT), so a Ray run shuts Serve and its local Ray instance down itself."""

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def server(
    name: str, replicas: int | None, threads: int, kv_tokens: int, max_num_seqs: int
) -> GracefulServer:
    port = _free_port()
    cmd = [sys.executable, "-m", "slimlm.cli", "serve", "--port", str(port), "--threads", str(threads),
           "--kv-cache-tokens", str(kv_tokens), "--max-num-seqs", str(max_num_seqs),
           "--max-concurrent-requests", "256", "--log-level", "warning"]  # fmt: skip
    if replicas is not None:
        cmd += ["--replicas", str(replicas)]
    return GracefulServer(name, cmd, port, {"ignore_eos": True}, "/health")


def bench(name: str, srv: GracefulServer, clients: int, max_tokens: int, rounds: int) -> dict:
    started = time.perf_counter()
    with srv:
        ready_s = time.perf_counter() - started
        asyncio.run(run_level(srv, 1, 1, 8, "warmup"))
        runs = [
            asyncio.run(run_level(srv, clients, clients, max_tokens, f"{name}-r{r}")) for r in range(rounds)
        ]
    out = {
        "startup_s": round(ready_s, 1),
        "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs),
        "ttft_p50_s": statistics.median(r["ttft_s"]["p50"] for r in runs),
        "ttft_p90_s": statistics.median(r["ttft_s"]["p90"] for r in runs),
        "tpot_p50_s": statistics.median(r["tpot_s"]["p50"] for r in runs),
        "rounds": runs,
    }
    print(f"  {name:8s} {out['output_tokens_per_s']:7.1f} tok/s  TTFT p50 {out['ttft_p50_s'] * 1000:6.0f} ms "
          f"p90 {out['ttft_p90_s'] * 1000:6.0f} ms  (started in {ready_s:.0f} s)", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-cache-tokens", type=int, default=8192, help="per engine / replica")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cluster_bench.json"))
    args = p.parse_args(argv)
    results = {}
    for name in args.configs:
        replicas, threads = CONFIGS[name]
        srv = server(name, replicas, threads, args.kv_cache_tokens, args.clients)
        results[name] = bench(name, srv, args.clients, args.max_tokens, args.rounds)
    base = results.get("plain")
    if base:
        for r in results.values():
            r["throughput_vs_plain"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
            r["ttft_p50_vs_plain"] = r["ttft_p50_s"] / base["ttft_p50_s"]
    report = {
        "command": "python benchmarks/cluster_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "kv_cache_tokens_per_engine": args.kv_cache_tokens, "machine": platform.platform(),
        "note": "2-core machine shared with other jobs while measured; medians over rounds",
        "results": results,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
