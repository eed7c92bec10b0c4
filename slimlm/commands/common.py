"""CLI flags shared by several commands; names mirror the Python API's parameter names."""

from __future__ import annotations

import argparse
import dataclasses
import re

from slimlm.commands.defaults import field_default
from slimlm.engine.config import EngineConfig
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'512MiB', '2GB', '1.5GiB', '1000000' -> bytes (GB = 10^9, GiB = 2^30)."""
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 512MiB, 2GB or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def require_text(text: str, what: str) -> str:
    """Python decodes argv and stdin with surrogateescape, so binary input arrives as a str holding lone
    surrogates that the tokenizer rejects with a TypeError; say what was wrong instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SlimlmError(
            f"{what} is not UTF-8 text (byte 0x{ord(text[e.start]) & 0xFF:02x} at character {e.start}); give text"
        ) from None
    return text


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file given by `flag`, or a one-line error (missing, a directory, binary)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SlimlmError(
            f"{flag} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); give a text file"
        ) from None
    except OSError as e:
        raise SlimlmError(f"cannot read {flag} {path}: {e.strerror or e}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "-m",
        default=None,
        help="HF directory, .gguf file, or alias (default: the embedded smollm2-135m)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="float32 | bfloat16 | float16 | auto (default: bfloat16 where fast, else float32)",
    )
    g.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    g.add_argument(
        "--weights",
        default="float",
        help="GGUF weights: float (dequantize to --dtype, default) | native (run Q4_0/Q4_1/Q8_0 blocks as "
        "they are on the C kernel: the file's exact weights, ~3x less memory; other types are dequantized "
        "with a note in the memory report)",
    )
    g.add_argument(
        "--weights-layout",
        default="auto",
        help="CPU linear weights: plain (what the C decode kernel reads; torch GEMV for one sequence) | "
        "packed (oneDNN, PyTorch's fastest batched) | both (linear weights held twice) | auto (plain "
        "where the C decode kernel runs or for one stream, else packed)",
    )
    g.add_argument(
        "--decode-kernel",
        default="auto",
        help="decode steps: c (slimlm's whole-model C kernel: CPU, bf16 plain weights, bf16/int8/int4 "
        "KV; an error where it cannot run) | torch (PyTorch ops) | auto (c where it runs with "
        "AVX512-BF16, default)",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache and batching")
    g.add_argument(
        "--cache-max-entry-count",
        type=float,
        default=field_default(EngineConfig, "cache_max_entry_count"),
        help="KV pool = this fraction of the memory free after loading weights (default %(default)s)",
    )
    g.add_argument("--kv-cache-tokens", type=int, default=None, help="absolute KV budget in tokens")
    g.add_argument("--kv-cache-bytes", type=parse_size, default=None, help="absolute KV budget, e.g. 512MiB")
    g.add_argument(
        "--block-size",
        type=int,
        default=field_default(EngineConfig, "block_size"),
        help="tokens per KV block (default %(default)s)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=field_default(EngineConfig, "max_num_seqs"),
        help="most sequences decoded together",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=field_default(EngineConfig, "max_num_batched_tokens"),
        help="most tokens in one step",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--kv-dtype", default=None, help="auto | bf16 | fp16 | fp32 | int8 | int4 | k8v4")
    g.add_argument(
        "--quant-policy", type=int, default=None, help="LMDeploy style: 0, 8 (int8 KV) or 4 (int4 KV)"
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached prompt blocks")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=field_default(SamplingParams, "max_tokens"))
    g.add_argument("--min-tokens", type=int, default=field_default(SamplingParams, "min_tokens"))
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=field_default(SamplingParams, "top_p"))
    g.add_argument("--top-k", type=int, default=field_default(SamplingParams, "top_k"))
    g.add_argument("--min-p", type=float, default=field_default(SamplingParams, "min_p"))
    g.add_argument(
        "--repetition-penalty", type=float, default=field_default(SamplingParams, "repetition_penalty")
    )
    g.add_argument(
        "--presence-penalty", type=float, default=field_default(SamplingParams, "presence_penalty")
    )
    g.add_argument(
        "--frequency-penalty", type=float, default=field_default(SamplingParams, "frequency_penalty")
    )
    g.add_argument(
        "--no-repeat-ngram-size", type=int, default=field_default(SamplingParams, "no_repeat_ngram_size")
    )
    g.add_argument("--num-beams", type=int, default=field_default(SamplingParams, "num_beams"))
    g.add_argument("--length-penalty", type=float, default=field_default(SamplingParams, "length_penalty"))
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[])
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="return the top-N log-probabilities per token")


def sampling_params_from_args(args: argparse.Namespace):
    from slimlm.engine.params import SamplingParams

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in vars(args).items() if k in names})


def engine_config_from_args(args: argparse.Namespace, single_stream: bool = False):
    from slimlm.engine.config import EngineConfig, kv_dtype_from_quant_policy

    kv_dtype = args.kv_dtype or "auto"
    if args.quant_policy is not None:
        policy_dtype = kv_dtype_from_quant_policy(args.quant_policy)
        if args.kv_dtype and args.kv_dtype != policy_dtype:
            raise SlimlmError(
                f"--kv-dtype {args.kv_dtype} contradicts --quant-policy {args.quant_policy}; give one"
            )
        kv_dtype = policy_dtype
    return EngineConfig(
        cache_max_entry_count=args.cache_max_entry_count,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_bytes=args.kv_cache_bytes,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        kv_dtype=kv_dtype,
        decode_kernel=getattr(args, "decode_kernel", "auto"),
        weights_layout=getattr(args, "weights_layout", "auto"),
        single_stream=single_stream,
    )


def llm_from_args(args: argparse.Namespace, progress: bool = True, single_stream: bool = False):
    """`single_stream`: the command decodes one sequence at a time (chat, one prompt), so "auto" weights
    are laid out for one-row steps."""
    from slimlm.engine.llm import LLM

    if args.threads is not None:
        if args.threads <= 0:
            raise SlimlmError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from slimlm.loading.gguf_native import check_weights_choice

    engine_config = engine_config_from_args(args, single_stream)  # bad flags fail here, before loading
    weights = getattr(args, "weights", "float")
    check_weights_choice(weights)
    return LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        engine_config=engine_config,
        progress=progress,
        weights=weights,
    )
