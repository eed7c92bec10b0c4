"""Prometheus text exposition (format 0.0.4) of the server's and the engine's counters.

Written by hand: a few counters and gauges do not need a client library. All updates happen on the
asyncio loop thread; the engine's numbers come from the snapshot its thread publishes.
"""

from __future__ import annotations

import bisect
from collections import Counter

from slimlm.server.async_engine import EngineSnapshot

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {running}"]
        return out


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.http_responses: Counter[tuple[str, int]] = Counter()
        self.requests: Counter[str] = Counter()  # generation requests accepted, by endpoint
        self.finish_reasons: Counter[str] = Counter()
        self.rejected_busy = 0
        self.in_flight = 0
        self.time_to_first_token = Histogram()
        self.request_latency = Histogram()

    def count_http(self, path: str, status: int) -> None:
        known = path if path.startswith("/v1/") or path in ("/", "/ui", "/health", "/metrics") else "other"
        self.http_responses[(known, status)] += 1

    def render(self, engine: EngineSnapshot) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP slimlm_{name} {help_text}")
            lines.append(f"# TYPE slimlm_{name} {kind}")
            lines.extend(f"slimlm_{name}{labels} {value}" for labels, value in samples)

        metric(
            "http_responses_total",
            "counter",
            "HTTP responses by path and status code.",
            [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in sorted(self.http_responses.items())],
        )
        metric(
            "requests_total",
            "counter",
            "Generation requests accepted, by endpoint.",
            [(f'{{endpoint="{e}"}}', n) for e, n in sorted(self.requests.items())],
        )
        metric(
            "requests_finished_total",
            "counter",
            "Choices finished, by finish reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finish_reasons.items())],
        )
        metric(
            "requests_rejected_busy_total",
            "counter",
            "Requests refused with 429 (too many in flight).",
            [("", self.rejected_busy)],
        )
        metric(
            "requests_in_flight", "gauge", "HTTP generation requests being served.", [("", self.in_flight)]
        )
        metric(
            "requests_aborted_total",
            "counter",
            "Sequences aborted (client gone).",
            [("", engine.requests_aborted)],
        )
        metric(
            "engine_failures_total", "counter", "Engine steps that raised.", [("", engine.engine_failures)]
        )
        metric("num_requests_running", "gauge", "Sequences in the running batch.", [("", engine.num_running)])
        metric(
            "num_requests_waiting",
            "gauge",
            "Sequences waiting for a slot (queue length).",
            [("", engine.num_waiting)],
        )
        metric("prompt_tokens_total", "counter", "Prompt tokens received.", [("", engine.prompt_tokens)])
        metric(
            "prompt_tokens_computed_total",
            "counter",
            "Prompt tokens run through the model (not cached).",
            [("", engine.computed_prompt_tokens)],
        )
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", engine.generated_tokens)])
        metric("engine_steps_total", "counter", "Engine steps run.", [("", engine.steps)])
        metric(
            "preemptions_total",
            "counter",
            "Sequences preempted for lack of KV blocks.",
            [("", engine.preemptions)],
        )
        metric("kv_cache_blocks", "gauge", "KV cache blocks in the pool.", [("", engine.kv_blocks_total)])
        metric("kv_cache_blocks_free", "gauge", "KV cache blocks free.", [("", engine.kv_blocks_free)])
        metric(
            "kv_cache_usage_ratio",
            "gauge",
            "Fraction of KV blocks in use.",
            [("", round(engine.kv_usage, 6))],
        )
        for name, hist, help_text in (
            (
                "time_to_first_token_seconds",
                self.time_to_first_token,
                "Seconds from request to its first token.",
            ),
            ("request_latency_seconds", self.request_latency, "Seconds from request to its last token."),
        ):
            lines.append(f"# HELP slimlm_{name} {help_text}")
            lines.append(f"# TYPE slimlm_{name} histogram")
            lines.extend(f"slimlm_{line}" for line in hist.lines(name))
        return "\n".join(lines) + "\n"
