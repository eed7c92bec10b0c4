"""Weight variants of one model measured side by side, each in its own process (so peak RSS is its own).

    python -m slimlm.bench.variants VARIANT [--threads 2 ...]   -> one JSON line on stdout

VARIANT: bf16 (the GGUF dequantized), native (the GGUF's own Q4_1/Q8_0 blocks on the C kernel),
w4g32 / w4g64 / w4g128 / w8 / w4g64e8 / w4g64e8rot (slimlm RTN checkpoints, made once with `slimlm quantize` under the cache
directory), llama.cpp (llama-cpp-python on the same GGUF).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

VARIANTS = ("bf16", "native", "w4g32", "w4g64", "w4g128", "w8", "w4g64e8", "w4g64e8rot", "llama.cpp")
# w4g64e8: the format of the recommended g64 method (int4 g64, 8-bit table; AWQ + GPTQ write the same
# format, so RTN measures its speed); w4g64e8rot: the same rotated (an untied head beside the table).
# w8: `slimlm quantize --bits 8` as a user runs it (the default recipe: group 64 here, int8 g32 table).
CHECKPOINTS = {"w4g32": ("4", "32"), "w4g64": ("4", "64"), "w4g128": ("4", "128"), "w8": ("8", "auto"),
               "w4g64e8": ("4", "64", "--embedding-bits", "8"),
               "w4g64e8rot": ("4", "64", "--embedding-bits", "8", "--rotate", "hadamard")}  # fmt: skip


def checkpoint(variant: str, cache: Path, model: str | None = None) -> Path:
    """The RTN checkpoint of `model` (default: the embedded one) for `variant`, quantized once."""
    from slimlm.bench.models import model_tag

    bits, group, *extra = CHECKPOINTS[variant]
    # the recipe's flags are in the directory's name, so a changed recipe is not served an old checkpoint
    # (a changed default of `slimlm quantize` is not seen: delete the cache directory then)
    recipe = hashlib.sha1(" ".join(CHECKPOINTS[variant]).encode()).hexdigest()[:8]
    out = cache / f"{model_tag(model)}-{variant}-{recipe}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "slimlm.cli", "quantize", "--bits", bits, "--group-size", group,
                        "--method", "rtn", *extra, "--out", str(out), "--quiet",
                        *(["--model", model] if model else [])], check=True)  # fmt: skip
    return out


def _one_run(runner, prompts, single, gen_len: int, cpu_time: bool) -> dict:
    """One measurement: TTFT and batch-1 rate of `single`, then all `prompts` at once.

    Wall clock by default. With `cpu_time`, process CPU seconds instead (for a machine shared with other
    jobs: on 1 thread the CPU time of a step is its work, whatever the scheduler does): TTFT = CPU of a
    2-token request; decode = (CPU of a gen_len request - TTFT) / (gen_len - 2) per token; throughput =
    generated tokens per CPU second of all prompts together."""
    import time

    if not cpu_time:
        first, rate = runner.first_and_rate(single, gen_len)
        return {
            "ttft_s": first,
            "decode_tok_s": rate,
            "throughput_tok_s": runner.throughput(prompts, gen_len),
        }

    def cpu(fn):
        start = time.process_time()
        fn()
        return time.process_time() - start

    first = cpu(lambda: runner.first_and_rate(single, 2))  # the runners need 2 tokens for a rate
    total = cpu(lambda: runner.first_and_rate(single, gen_len))
    batch = cpu(lambda: runner.throughput(prompts, gen_len))
    return {"ttft_s": first, "decode_tok_s": (gen_len - 2) / max(total - first, 1e-9),
            "throughput_tok_s": len(prompts) * gen_len / batch}  # fmt: skip


class VariantChild:
    """One variant loaded in this process: `run()` measures once, `result()` gives the medians, the peak
    RSS and the roofline. The parent (`run_variants`) drives several of these, one process each, in
    interleaved rounds."""

    def __init__(self, variant: str, cache: Path, concurrency: int, prompt_len: int, gen_len: int,
                 cpu_time: bool = False, model_arg: str | None = None) -> None:  # fmt: skip
        import torch

        from slimlm.bench.peers import LlamaCppRunner, SlimlmRunner
        from slimlm.bench.workload import make_prompts
        from slimlm.engine.llm import LLM
        from slimlm.loading import default_model_path

        self.gen_len, self.cpu_time = gen_len, cpu_time
        kv_tokens = (concurrency + 1) * (prompt_len + gen_len + 16)
        # The process before any model: torch, slimlm and the engine imported (the same in every variant).
        # Reported beside the peak so that what each variant itself adds can be compared too.
        self.baseline_rss = _current_rss()
        from slimlm.bench.models import variant_model

        model, weights = variant_model(variant, model_arg, cache, checkpoint)
        llm = LLM(
            model, dtype="bfloat16", device="cpu", kv_cache_tokens=kv_tokens, progress=False, weights=weights
        )
        prompts = make_prompts(llm.tokenizer, concurrency + 1, prompt_len)
        self.single, self.prompts = prompts[0], prompts[1:]
        self.info: dict = {"variant": variant, "clock": "process CPU time" if cpu_time else "wall"}
        self.llm = None
        if variant == "llama.cpp":
            del llm
            self.runner = LlamaCppRunner(
                default_model_path(), torch.get_num_threads(), n_ctx=prompt_len + gen_len + 64
            )
            self.info["weights"] = "GGUF Q4_1 linears, Q8_0 embedding (llama.cpp's own kernels)"
        else:
            self.llm = llm
            self.runner = SlimlmRunner(llm)
            report = llm.memory_report()
            self.info.update(weights=report["weights_format"], weights_bytes=report["weights_bytes"],
                             decode_kernel=report["decode_kernel"], notes=report["notes"])  # fmt: skip
        self.runner.first_and_rate(self.single[:16], 4)  # warm-up: allocator, kernels, caches
        self.runs: list[dict] = []

    def run(self) -> dict:
        self.runs.append(_one_run(self.runner, self.prompts, self.single, self.gen_len, self.cpu_time))
        return self.runs[-1]

    def result(self) -> dict:
        import statistics

        result = dict(self.info)
        for key in ("ttft_s", "decode_tok_s", "throughput_tok_s"):
            result[key] = statistics.median(r[key] for r in self.runs)
        result["runs"] = {
            key: [r[key] for r in self.runs] for key in ("ttft_s", "decode_tok_s", "throughput_tok_s")
        }
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.baseline_rss is not None:
            result.update(baseline_rss_bytes=self.baseline_rss,
                          peak_rss_above_baseline_bytes=result["peak_rss_bytes"] - self.baseline_rss)  # fmt: skip
        if self.llm is not None:  # weight bytes streamed per token; the parent adds the roofline
            result["bytes_per_token"] = result["weights_bytes"] - _lookup_only_bytes(self.llm.loaded.model)
        return result


def _current_rss() -> int | None:
    """Resident bytes now (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _lookup_only_bytes(model) -> int:
    """Bytes of an untied embedding table: a decode step reads one row of it, not the whole table."""
    from slimlm.kernels.qlinear import KernelEmbedding

    embed = model.model.embed_tokens
    if isinstance(embed, KernelEmbedding):
        return 0 if embed.tied else embed.table.kernel_weight().nbytes
    head = getattr(model.lm_head, "weight", None)
    return 0 if head is embed.weight else embed.weight.numel() * embed.weight.element_size()


def run_variants(names: list[str], threads: int, runs: int, gen_len: int, prompt_len: int, cpu_time: bool = False,
                 log=print, model: str | None = None) -> dict:  # fmt: skip
    """Each variant in its own process (its own peak RSS), measured in interleaved rounds: every process
    loads its model first, then round r runs each variant once, in an order rotated by r. So every
    variant sees the same stretch of a shared machine's noise, and each ratio against bf16 / llama.cpp
    is the median of the per-round ratios (paired), beside the medians of the values. Unknown names are
    a SlimlmError."""
    from slimlm.bench.rounds import run_rounds
    from slimlm.errors import SlimlmError

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SlimlmError(f"unknown --variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if model is not None:
        from slimlm.bench.models import check_model_variants

        check_model_variants(names)
    child = [sys.executable, "-m", "slimlm.bench.variants", "--threads", str(threads), "--gen-len", str(gen_len),
             "--prompt-len", str(prompt_len), "--rounds", *(["--cpu-time"] if cpu_time else []),
             *(["--model", model] if model else [])]  # fmt: skip
    # The roofline's bandwidth is the machine's, not a variant's: measured in a fresh process with nothing
    # else loaded, before the children start and after they exit (measured inside each child at the end,
    # it fell from child to child and made the fractions meaningless: docs/engine.md, "The final
    # measurement"); the higher is used.
    before = fresh_read_bandwidth()
    rows = run_rounds({name: [*child, name] for name in names}, runs, log)
    add_roofline(rows, [before, fresh_read_bandwidth()])
    return rows


def fresh_read_bandwidth() -> float:
    """Bytes/s that torch.sum streams from memory, measured in a new process (torch imported, no model)."""
    code = "from slimlm.bench.ceiling import read_bandwidth; print(read_bandwidth(512 * 2**20, repeats=7))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def add_roofline(rows: dict, bandwidths: list[float]) -> None:
    """`roofline_tok_s` (bandwidth / weight bytes per token) and `roofline_fraction` (decode rate over it)
    for every row that reports its `bytes_per_token`. The bandwidth is the highest of the measurements
    (bytes/s): what the machine can stream, the same figure for every row; all of them are kept."""
    bandwidth = max(bandwidths)
    for row in rows.values():
        if "bytes_per_token" in row and "decode_tok_s" in row:
            row.update(read_bandwidth_gb_s=bandwidth / 1e9,
                       read_bandwidth_measured_gb_s=[b / 1e9 for b in bandwidths],
                       roofline_tok_s=bandwidth / row["bytes_per_token"],
                       roofline_fraction=row["decode_tok_s"] * row["bytes_per_token"] / bandwidth)  # fmt: skip


def print_variants(rows: dict, log=print) -> None:
    log(f"{'variant':10} {'TTFT ms':>8} {'decode':>8} {'16-way':>8} {'RSS MiB':>8}  decode/bf16 decode/llama "
        "16-way/bf16 RSS/bf16 roofline  RSS-base MiB (base)  /bf16")  # fmt: skip
    for name, r in rows.items():
        if "error" in r:
            log(f"{name:10} error: {r['error']}")
            continue
        log(f"{name:10} {r['ttft_s'] * 1000:8.0f} {r['decode_tok_s']:8.1f} {r['throughput_tok_s']:8.1f} "
            f"{r['peak_rss_bytes'] / 2**20:8.0f}  {r.get('decode_tok_s_vs_bf16', 0):11.2f} "
            f"{r.get('decode_tok_s_vs_llama_cpp', 0):12.2f} {r.get('throughput_tok_s_vs_bf16', 0):11.2f} "
            f"{r.get('peak_rss_bytes_vs_bf16', 0):8.2f} {r.get('roofline_fraction', 0):8.2f}  "
            f"{r.get('peak_rss_above_baseline_bytes', 0) / 2**20:12.0f} ({r.get('baseline_rss_bytes', 0) / 2**20:3.0f})  "
            f"{r.get('peak_rss_above_baseline_bytes_vs_bf16', 0):5.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "slimlm" / "bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--cpu-time", action="store_true", help="measure process CPU time (shared machines)")
    ap.add_argument("--rounds", action="store_true",
                    help="driven by a parent over stdin/stdout (slimlm.bench.rounds); --runs is ignored")  # fmt: skip
    ap.add_argument("--model", default=None, help="HF dir or synthetic alias (slimlm/bench/models.py)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    child = VariantChild(args.variant, Path(args.cache), args.concurrency, args.prompt_len, args.gen_len,
                         args.cpu_time, args.model)  # fmt: skip
    if args.rounds:
        from slimlm.bench.rounds import serve_rounds

        serve_rounds(child)
        return
    for i in range(args.runs):
        r = child.run()
        print(f"  run {i + 1}/{args.runs}: ttft {r['ttft_s'] * 1000:.0f} ms, decode {r['decode_tok_s']:.1f} tok/s, "
              f"{len(child.prompts)}-way {r['throughput_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps(child.result()))


if __name__ == "__main__":
    main()
