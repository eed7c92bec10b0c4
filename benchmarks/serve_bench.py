"""Serving benchmark: `slimlm serve` vs llama.cpp's own `llama-server` (and llama-cpp-python's server)
on the same GGUF, in the same run, with the offline engine's single-stream rate as the yardstick for
what the HTTP layer costs.

Each server runs alone (one after the other) with the same thread count. At each concurrency level,
that many clients stream chat completions (unique prompts, a fixed number of output tokens) and we
report, per level:

  TTFT  time to first token (request sent -> first content chunk), p50 / p90 / p99
  TPOT  time per output token after the first, per request: (last - first) / (tokens - 1)
  ITL   inter-token latency: every gap between consecutive content chunks, pooled
  throughput  output tokens/s and requests/s over the level's wall time

    python benchmarks/serve_bench.py                       # both servers, concurrency 1 8 32
    python benchmarks/serve_bench.py --skip-llama-cpp --concurrency 1 8 --max-tokens 32

Peers (each skipped with a message when missing):
  llama-server      llama.cpp's C++ server: parallel slots (`-np` = the largest concurrency) and
                    continuous batching, the fair peer under concurrent load. Binary from
                    --llama-cpp-bin or $LLAMA_CPP_BIN (default /work/tools/llama-build/bin).
  llama-cpp-python  its Python server handles one request at a time (no parallel slots); only with
                    --with-llama-cpp-python.
  offline           slimlm's engine without HTTP (LLM.stream, one request), in a subprocess with the
                    same threads: server c=1 tok/s divided by this is what the server keeps.
Output length is forced equal: slimlm and llama-server get `ignore_eos`, llama-cpp-python a logit bias
that bans the end-of-turn tokens.
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


def llama_server(binary: Path, gguf: Path, threads: int, slots: int, n_ctx_per_slot: int) -> Server:
    port = _free_port()
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "--alias",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-np",
        str(slots),
        "-c",
        str(slots * n_ctx_per_slot),  # the context is shared out among the slots
        "-ngl",
        "0",
    ]
    return Server("llama-server", cmd, port, {"ignore_eos": True}, "/health")


_OFFLINE = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
llm = LLM(None, dtype=sys.argv[3], kv_cache_tokens=16384, max_num_seqs=int(sys.argv[4]), progress=False)
params = SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True)
rates = []
for i in range(4):
    ids = llm.chat_prompt([{"role": "user", "content": f"[offline-{i}] Write a long story about cats."}])
    times = [time.perf_counter() for _ in llm.stream(ids, params)]
    if i:  # the first run warms up
        rates.append((len(times) - 1) / (times[-1] - times[0]))
print(json.dumps(sorted(rates)[len(rates) // 2]))
"""


def offline_rate(threads: int, max_tokens: int, dtype: str, max_num_seqs: int) -> float:
    """Median single-stream decode tok/s of the engine alone (first token to last, as TPOT measures)."""
    out = subprocess.run(
        [sys.executable, "-c", _OFFLINE, str(threads), str(max_tokens), dtype, str(max_num_seqs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


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
    return Server("llama-cpp-python", cmd, port, {"logit_bias": BANNED_TOKENS}, "/v1/models")


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
    p.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp peer at all")
    p.add_argument(
        "--llama-cpp-bin",
        default=os.environ.get("LLAMA_CPP_BIN", "/work/tools/llama-build/bin"),
        help="folder holding llama-server (default $LLAMA_CPP_BIN or /work/tools/llama-build/bin)",
    )
    p.add_argument(
        "--with-llama-cpp-python",
        action="store_true",
        help="also run llama-cpp-python's server (one request at a time)",
    )
    p.add_argument("--skip-offline", action="store_true", help="skip the offline-engine yardstick")
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
    if not args.skip_offline:
        rate = offline_rate(args.threads, args.max_tokens, args.dtype, max(args.concurrency))
        report["offline_engine_tok_s"] = rate
        print(f"  offline engine, one stream: {rate:.1f} tok/s", flush=True)
    binary = Path(args.llama_cpp_bin) / "llama-server"
    if args.skip_llama_cpp:
        report["llama_server"] = "skipped (--skip-llama-cpp)"
    elif not binary.exists():
        report["llama_server"] = f"unavailable: {binary} is missing (set --llama-cpp-bin or $LLAMA_CPP_BIN)"
        print(f"llama-server: {report['llama_server']}")
    else:
        try:
            report["systems"]["llama-server"] = bench_server(
                llama_server(binary, gguf, args.threads, max(args.concurrency), args.max_tokens + 256),
                args.concurrency,
                args.max_tokens,
                args.min_requests,
            )
        except (RuntimeError, httpx.HTTPError) as e:
            report["llama_server"] = f"unavailable: {e}"
            print(f"llama-server: {report['llama_server']}")
    if args.skip_llama_cpp or not args.with_llama_cpp_python:
        report["llama_cpp_python"] = "skipped (pass --with-llama-cpp-python)"
    elif importlib.util.find_spec("llama_cpp") is None:
        report["llama_cpp_python"] = (
            "unavailable: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
        )
        print(f"llama-cpp-python: {report['llama_cpp_python']}")
    else:
        try:
            n_ctx = 4 * (args.max_tokens + 256)
            report["systems"]["llama-cpp-python"] = bench_server(
                llama_cpp_server(gguf, args.threads, n_ctx),
                args.concurrency,
                args.max_tokens,
                args.min_requests,
            )
        except (RuntimeError, httpx.HTTPError) as e:
            report["llama_cpp_python"] = f"unavailable: {e}"
            print(f"llama-cpp-python: {report['llama_cpp_python']}")
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
    mine_rows = report["systems"].get("slimlm", [])
    for peer in ("llama-server", "llama-cpp-python"):
        for mine, theirs in zip(mine_rows, report["systems"].get(peer, []), strict=False):
            ratio = mine["output_tokens_per_s"] / theirs["output_tokens_per_s"]
            print(f"concurrency {mine['concurrency']}: slimlm / {peer} throughput = {ratio:.2f}x")
    offline = report.get("offline_engine_tok_s")
    if offline and mine_rows and mine_rows[0]["concurrency"] == 1 and mine_rows[0]["tpot_s"]["p50"]:
        served = 1 / mine_rows[0]["tpot_s"]["p50"]
        report["served_over_offline_c1"] = served / offline
        print(
            f"one stream: served {served:.1f} tok/s (1 / TPOT p50) = {served / offline:.2f} of the offline engine"
        )


if __name__ == "__main__":
    sys.exit(main())
