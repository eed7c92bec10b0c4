"""CLI flags shared by several commands; names mirror the Python API's parameter names."""

from __future__ import annotations

import argparse

from slimlm.engine.config import EngineConfig
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.settings import add_fields, from_args


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
    add_fields(g, EngineConfig, ["weights_layout", "decode_kernel"])
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache and batching")
    add_fields(g, EngineConfig, ["cache_max_entry_count", "kv_cache_tokens", "kv_cache_bytes", "block_size",
                                 "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_dtype"])  # fmt: skip
    g.add_argument(
        "--quant-policy", type=int, default=None, help="LMDeploy style: 0, 8 (int8 KV) or 4 (int4 KV)"
    )
    add_fields(g, EngineConfig, ["enable_prefix_caching"])


# The CLI decodes greedily unless asked; the library and the server keep OpenAI's temperature 1.0.
CLI_TEMPERATURE = 0.0


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    names = ["max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "seed",
             "stop", "stop_token_ids", "ignore_eos", "logprobs"]  # fmt: skip
    add_fields(g, SamplingParams, names, temperature=CLI_TEMPERATURE)


def sampling_params_from_args(args: argparse.Namespace):
    return from_args(SamplingParams, args)


def engine_config_from_args(args: argparse.Namespace, single_stream: bool = False):
    from slimlm.engine.config import kv_dtype_from_quant_policy

    overrides = {}
    if getattr(args, "quant_policy", None) is not None:
        policy_dtype = kv_dtype_from_quant_policy(args.quant_policy)
        if args.kv_dtype and args.kv_dtype != policy_dtype:
            raise SlimlmError(
                f"--kv-dtype {args.kv_dtype} contradicts --quant-policy {args.quant_policy}; give one"
            )
        overrides["kv_dtype"] = policy_dtype
    return from_args(EngineConfig, args, single_stream=single_stream, **overrides)


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
