"""Engine settings, validated up front so a bad flag fails before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError

KV_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8", "int4", "k8v4")
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

    cache_max_entry_count: float = 0.8
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kv_dtype: str = "auto"
    decode_kernel: str = "auto"
    weights_layout: str = "auto"
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
        if self.kv_dtype not in KV_DTYPES:
            raise SlimlmError(f"unknown KV dtype {self.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
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
