"""Serving benchmark: `slimlm serve` vs llama-cpp-python's OpenAI server on the same GGUF, same run.

Each server runs alone (one after the other) with the same thread count. At each concurrency level,
that many clients stream chat completions (unique prompts, a fixed number of output tokens) and we
report, per level:

  TTFT  time to first token (request sent -> first content chunk), p50 / p90 / p99
  TPOT  time per output token after the first, per request: (last - first) / (tokens - 1)
  ITL   inter-token latency: every gap between consecutive content chunks, pooled
  throughput  output tokens/s and requests/s over the level's wall time

    python benchmarks/serve_bench.py                       # both servers, concurrency 1 8 32
    python benchmarks/serve_bench.py --skip-llama-cpp --concurrency 1 8 --max-tokens 32

llama-cpp-python is optional (`pip install 'llama-cpp-python[server]'`); without it only slimlm runs.
Its server handles one request at a time (`interrupt_requests` off, so they queue instead of cutting
each other off); slimlm batches them. Output length is forced equal: slimlm gets `ignore_eos`,
llama.cpp a logit bias that bans the end-of-turn tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
SUBJECTS = [
    "cats",
    "rivers",
    "the moon",
    "bread",
    "trains",
    "winter",
    "music",
    "chess",
    "the sea",
    "bees",
    "volcanoes",
    "paper",
    "clocks",
    "forests",
    "salt",
    "bridges",
]
BANNED_TOKENS = {"0": -100, "1": -100, "2": -100}  # SmolLM2: <|endoftext|>, <|im_start|>, <|im_end|>


@dataclass
class RequestTiming:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


class Server:
    """A server subprocess; `extra_body` is what its requests add to force the output length."""

    def __init__(self, name: str, cmd: list[str], port: int, extra_body: dict, ready_path: str) -> None:
        self.name, self.cmd, self.port, self.extra_body, self.ready_path = (
            name,
            cmd,
            port,
            extra_body,
            ready_path,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.memory_report: str | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_bench_{name}.log"

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), cwd=REPO)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in 300 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def slimlm_server(threads: int, dtype: str, max_num_seqs: int) -> Server:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "serve",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--dtype",
        dtype,
        "--kv-cache-tokens",
        "16384",
        "--max-num-seqs",
        str(max_num_seqs),
        "--max-concurrent-requests",
        "256",
        "--log-level",
        "warning",
    ]
    return Server("slimlm", cmd, port, {"ignore_eos": True}, "/health")


def llama_cpp_server(gguf: Path, threads: int, n_ctx: int) -> Server:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(n_ctx),
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    return Server("llama.cpp", cmd, port, {"logit_bias": BANNED_TOKENS}, "/v1/models")


async def _one_request(
    client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int
) -> RequestTiming:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **server.extra_body,
    }
    timing = RequestTiming(time.perf_counter())
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.prompt_tokens = chunk["usage"].get("prompt_tokens")
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    timing.chunk_times.append(time.perf_counter())
                    timing.tokens += 1
    return timing


async def run_level(server: Server, concurrency: int, num_requests: int, max_tokens: int, tag: str) -> dict:
    prompts = [
        f"[{tag}-{i}] Write a long story about {SUBJECTS[i % len(SUBJECTS)]}." for i in range(num_requests)
    ]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:

        async def bounded(prompt: str) -> RequestTiming:
            async with gate:
                return await _one_request(client, server, prompt, max_tokens)

        start = time.perf_counter()
        timings = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    ttft = [t.chunk_times[0] - t.start for t in timings if t.chunk_times]
    tpot = [
        (t.chunk_times[-1] - t.chunk_times[0]) / (len(t.chunk_times) - 1)
        for t in timings
        if len(t.chunk_times) > 1
    ]
    itl = [b - a for t in timings for a, b in zip(t.chunk_times, t.chunk_times[1:], strict=False)]
    tokens = sum(t.tokens for t in timings)
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "output_tokens": tokens,
        "wall_s": wall,
        "mean_output_tokens": tokens / num_requests,
        "ttft_s": _percentiles(ttft),
        "tpot_s": _percentiles(tpot),
        "itl_s": _percentiles(itl),
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": num_requests / wall,
    }


def bench_server(server: Server, levels: list[int], max_tokens: int, min_requests: int) -> list[dict]:
    results = []
    with server:
        asyncio.run(run_level(server, 1, 1, 8, "warmup"))
        server.memory_report = next(
            (line.strip() for line in server.log.read_text().splitlines() if "KV pool" in line), None
        )
        for c in levels:
            r = asyncio.run(run_level(server, c, max(c, min_requests), max_tokens, f"c{c}"))
            print(f"  {server.name:9s} c={c:<3d} {_row(r)}", flush=True)
            results.append(r)
    return results


def _ms(p: dict) -> str:
    return "/".join("-" if p[k] is None else f"{p[k] * 1000:.0f}" for k in ("p50", "p90", "p99"))


def _row(r: dict) -> str:
    return (
        f"TTFT {_ms(r['ttft_s']):>16s} ms  TPOT {_ms(r['tpot_s']):>14s} ms  ITL {_ms(r['itl_s']):>14s} ms  "
        f"{r['output_tokens_per_s']:7.1f} tok/s  {r['requests_per_s']:5.2f} req/s  ({r['output_tokens']} tokens)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (forced)")
    p.add_argument("--min-requests", type=int, default=8, help="requests per level at least (default 8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for each server")
    p.add_argument("--dtype", default="auto", help="slimlm's compute dtype (default auto)")
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_bench.json"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from slimlm.loading import default_model_path

    gguf = default_model_path()
    report = {
        "model": str(gguf.name),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "systems": {},
    }
    print(
        f"model {gguf.name}, {args.threads} threads, {args.max_tokens} output tokens/request, "
        f"concurrency {args.concurrency}",
        flush=True,
    )
    slimlm = slimlm_server(args.threads, args.dtype, max(args.concurrency))
    report["systems"]["slimlm"] = bench_server(slimlm, args.concurrency, args.max_tokens, args.min_requests)
    report["slimlm_memory_report"] = slimlm.memory_report
    print(f"slimlm: {slimlm.memory_report}")
    if args.skip_llama_cpp:
        report["llama_cpp"] = "skipped (--skip-llama-cpp)"
    elif importlib.util.find_spec("llama_cpp") is None:
        report["llama_cpp"] = (
            "unavailable: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
        )
        print(f"llama.cpp: {report['llama_cpp']}")
    else:
        try:
            n_ctx = 4 * (args.max_tokens + 256)
            report["systems"]["llama.cpp"] = bench_server(
                llama_cpp_server(gguf, args.threads, n_ctx),
                args.concurrency,
                args.max_tokens,
                args.min_requests,
            )
        except (RuntimeError, httpx.HTTPError) as e:
            report["llama_cpp"] = f"unavailable: {e}"
            print(f"llama.cpp: {report['llama_cpp']}")
    report["load_average_at_end"] = os.getloadavg()
    _print_table(report)
    print(
        f"load average (1/5/15 min) at start {report['load_average_at_start']}, at end {report['load_average_at_end']}:"
        f" on a shared machine, compare only numbers taken in the same run"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _print_table(report: dict) -> None:
    print("\nsystem     conc  TTFT p50/p90/p99 ms   TPOT p50/p90/p99 ms  ITL p50/p90/p99 ms   tok/s    req/s")
    for name, rows in report["systems"].items():
        for r in rows:
            print(
                f"{name:10s} {r['concurrency']:4d}  {_ms(r['ttft_s']):>18s}  {_ms(r['tpot_s']):>18s}  "
                f"{_ms(r['itl_s']):>16s}  {r['output_tokens_per_s']:7.1f}  {r['requests_per_s']:6.2f}"
            )
    if "slimlm" in report["systems"] and "llama.cpp" in report["systems"]:
        for mine, theirs in zip(report["systems"]["slimlm"], report["systems"]["llama.cpp"], strict=True):
            ratio = mine["output_tokens_per_s"] / theirs["output_tokens_per_s"]
            print(f"concurrency {mine['concurrency']}: slimlm / llama.cpp throughput = {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
