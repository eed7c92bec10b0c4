"""Interleaved rounds: several measured systems, one process each, all loaded at once, run in turn.

Why: on a shared VM the same variant measured twice a minute apart can differ by 15-20%, so variants
measured one after the other (each with all its runs) carry that drift into their ratios. Here every
child loads its model first (one at a time, so loading peaks and CPU do not overlap), then round r runs
each child once, in an order rotated by r, while the others sit idle. A ratio against the reference is
the median of the per-round ratios, each taken between runs seconds apart.

Protocol (one JSON object per line): the child prints {"ready": true} once loaded, then answers each
"run" line on its stdin with that run's figures and the "done" line with its final result.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path

# figures whose ratio against a reference is reported; higher is better for all but ttft and RSS
RATIO_KEYS = ("decode_tok_s", "throughput_tok_s", "ttft_s")
RESULT_RATIO_KEYS = ("peak_rss_bytes", "peak_rss_above_baseline_bytes")
REFERENCES = {"bf16": "vs_bf16", "llama.cpp": "vs_llama_cpp"}


def serve_rounds(child, stdin=None, stdout=None) -> None:
    """The child's side: announce readiness, then measure on each "run", report on "done"."""
    import sys

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def say(obj) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    say({"ready": True})
    for line in stdin:
        command = line.strip()
        if command == "run":
            say(child.run())
        elif command == "done":
            say(child.result())
            return
        else:
            say({"error": f"unknown command {command!r}: expected run or done"})


class _Child:
    """A started child process; its stderr goes to a file, so a chatty child can never block on a pipe."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name.replace('/', '_')}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.error: str | None = None

    def read(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:  # the child exited: its last stderr line says why
            self.proc.wait()
            self.log.flush()
            lines = self.log_path.read_text().strip().splitlines()
            self.error = lines[-1] if lines else f"exited with code {self.proc.returncode}"
            return None
        return json.loads(line)

    def send(self, command: str) -> dict | None:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # read() reports why
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_rounds(children: dict[str, list[str]], rounds: int, log=print) -> dict:
    """Start each child (`name -> argv`), wait until it is loaded, run `rounds` interleaved rounds, and
    return `name -> result` with ratios against bf16 and llama.cpp where those are among the names.
    A child that fails is reported as {"error": its last stderr line}; the others go on."""
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="slimlm-rounds-") as logdir:
        started: dict[str, _Child] = {}
        try:
            for name, argv in children.items():
                child = _Child(name, argv, Path(logdir))
                if child.read() is None:
                    rows[name] = {"error": child.error}
                    child.close()
                    continue
                started[name] = child
                log(f"{name}: loaded")
            live = list(started)
            per_round: list[dict[str, dict]] = []
            for r in range(rounds):
                order = live[r % len(live) :] + live[: r % len(live)] if live else []
                this_round = {}
                for name in order:
                    figures = started[name].send("run")
                    if figures is None:
                        rows[name] = {"error": started[name].error}
                        live.remove(name)
                        continue
                    this_round[name] = figures
                per_round.append(this_round)
                log(f"round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} {f['decode_tok_s']:.1f} / {f['throughput_tok_s']:.1f} tok/s" for n, f in this_round.items()))  # fmt: skip
            for name in live:
                result = started[name].send("done")
                rows[name] = result if result is not None else {"error": started[name].error}
        finally:
            for child in started.values():
                child.close()
    add_ratios(rows, per_round)
    return {name: rows[name] for name in children}


def add_ratios(rows: dict[str, dict], per_round: list[dict[str, dict]]) -> None:
    """`KEY_vs_bf16` / `KEY_vs_llama_cpp`: for per-run figures, the median over rounds of the ratio within
    each round (paired; `KEY_vs_bf16_rounds` lists them), or the ratio of the medians where there are no
    rounds to pair (results joined from separate runs); for the peak RSS, the ratio of the results."""
    for ref, suffix in REFERENCES.items():
        base = rows.get(ref, {})
        if "error" in base or not base:
            continue
        for name, row in rows.items():
            if "error" in row:
                continue
            for key in RATIO_KEYS:
                paired = [rnd[name][key] / rnd[ref][key] for rnd in per_round if name in rnd and ref in rnd]
                if paired:
                    row[f"{key}_{suffix}"] = statistics.median(paired)
                    row[f"{key}_{suffix}_rounds"] = paired
                elif key in row and key in base:
                    row[f"{key}_{suffix}"] = row[key] / base[key]
            for key in RESULT_RATIO_KEYS:
                if key in row and key in base:
                    row[f"{key}_{suffix}"] = row[key] / base[key]
