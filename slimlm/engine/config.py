"""Engine settings, validated up front so a bad flag fails before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.formats.dtypes import KV_DTYPES, kv_dtype_name
from slimlm.formats.sizes import parse_size
from slimlm.settings import arg

QUANT_POLICY_TO_KV_DTYPE = {0: "auto", 8: "int8", 4: "int4"}
# "auto": the whole-model C kernel for decode steps where it can run, else PyTorch;
# "c": the same, but an error where it cannot; "torch": PyTorch ops only (slimlm.kernels.fused_decode).
DECODE_KERNELS = ("auto", "c", "torch")
# How the linear weights are laid out (slimlm.models.prepack); "as loaded" leaves the model untouched
# (LLM.from_loaded's default: the caller owns the model). slimlm.engine.backend resolves "auto".
WEIGHTS_LAYOUTS = ("auto", "packed", "plain", "both", "as loaded")


@dataclass
class EngineConfig:
    """How much KV cache to hold and how to batch.

    The KV budget is one of: `kv_cache_tokens`, `kv_cache_bytes`, or (default) `cache_max_entry_count`,
    the fraction of the memory free after the weights are loaded (LMDeploy's semantics).
    """

    cache_max_entry_count: float = arg(
        0.8, help="KV pool = this fraction of the memory free after loading weights (default %(default)s)"
    )
    kv_cache_tokens: int | None = arg(None, help="absolute KV budget in tokens")
    kv_cache_bytes: int | None = arg(None, type=parse_size, help="absolute KV budget, e.g. 512MiB")
    block_size: int = arg(16, help="tokens per KV block (default %(default)s)")
    max_num_seqs: int = arg(64, help="most sequences decoded together")
    max_num_batched_tokens: int = arg(4096, help="most tokens in one step")
    max_model_len: int | None = arg(None, help="context limit (default: the model's)")
    enable_prefix_caching: bool = arg(
        True,
        names=("--no-prefix-caching",),
        action="store_false",
        help="disable reuse of cached prompt blocks",
    )
    # None on the command line: not given, so --quant-policy may set it
    kv_dtype: str = arg("auto", cli_default=None, help=" | ".join(KV_DTYPES))
    decode_kernel: str = arg(
        "auto",
        help="decode steps: c (slimlm's whole-model C kernel: CPU, bf16 plain weights, bf16/int8/int4 "
        "KV; an error where it cannot run) | torch (PyTorch ops) | auto (c where it runs with "
        "AVX512-BF16, default)",
    )
    weights_layout: str = arg(
        "auto",
        help="CPU linear weights: plain (what the C decode kernel reads; torch GEMV for one sequence) | "
        "packed (oneDNN, PyTorch's fastest batched) | both (linear weights held twice) | auto (plain "
        "where the C decode kernel runs or for one stream, else packed)",
    )
    single_stream: bool = False  # the caller decodes one sequence at a time: "auto" lays out for one row

    def __post_init__(self) -> None:
        if not 0 < self.cache_max_entry_count <= 1:
            raise SlimlmError(
                f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}; it is a fraction of free memory"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens <= 0:
            raise SlimlmError(f"kv_cache_tokens must be positive, got {self.kv_cache_tokens}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise SlimlmError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise SlimlmError("give either kv_cache_tokens or kv_cache_bytes, not both")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise SlimlmError(f"block_size must be a positive power of two, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise SlimlmError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise SlimlmError(f"max_model_len must be positive, got {self.max_model_len}")
        self.kv_dtype = kv_dtype_name(self.kv_dtype)  # the one check of --kv-dtype
        if self.decode_kernel not in DECODE_KERNELS:
            raise SlimlmError(
                f"unknown decode kernel {self.decode_kernel!r}; choose one of {', '.join(DECODE_KERNELS)}"
            )
        if self.weights_layout not in WEIGHTS_LAYOUTS:
            raise SlimlmError(
                f"unknown weights layout {self.weights_layout!r}; choose one of {', '.join(WEIGHTS_LAYOUTS[:4])}"
            )


def kv_dtype_from_quant_policy(policy: int) -> str:
    if policy not in QUANT_POLICY_TO_KV_DTYPE:
        raise SlimlmError(
            f"unknown quant_policy {policy}; LMDeploy's values are 0 (off), 8 (int8 KV) and 4 (int4 KV)"
        )
    return QUANT_POLICY_TO_KV_DTYPE[policy]
