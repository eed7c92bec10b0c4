"""The built decode library (decode_cpu.c and its headers), its ctypes descriptors, and what it can run."""

from __future__ import annotations

import ctypes

import torch

from slimlm.kernels.build import kernel_unavailable_reason, load_kernel

KERNEL = "decode_cpu"
_ptr = ctypes.c_void_p


class Weight(ctypes.Structure):
    """model.h's slim_weight."""

    _fields_ = [
        ("data", _ptr),
        ("scales", _ptr),
        ("perm", _ptr),
        *[(name, ctypes.c_int64) for name in ("rows", "k", "bits", "group", "scale_bits")],
    ]


_WEIGHTS = ("qkv_w", "o_w", "gate_up_w", "down_w")


class Layer(ctypes.Structure):
    """model.h's slim_layer."""

    _fields_ = [
        ("qkv_w", Weight),
        ("qkv_b", _ptr),
        ("o_w", Weight),
        ("gate_up_w", Weight),
        ("down_w", Weight),
        *[
            (name, _ptr)
            for name in (
                "in_norm",
                "post_norm",
                "k_cache",
                "v_cache",
                "k_scale",
                "v_scale",
                "k_zero",
                "v_zero",
                "k_stage",
                "v_stage",
                "q_norm",
                "k_norm",
                "attn_out_norm",
                "mlp_out_norm",
            )
        ],
        ("window", ctypes.c_int64),
        ("rope", ctypes.c_int64),
    ]


DIMS = ("hidden", "inter", "heads", "kv_heads", "head_dim", "layers", "vocab")
CACHE_DIMS = (
    *("block_size", "num_blocks", "max_ctx", "threads", "kv_bits"),
    *("k_bits", "v_bits", "k_group", "v_group", "key_channels", "sink_blocks"),
)


class Model(ctypes.Structure):
    """model.h's slim_model."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in (*DIMS, *CACHE_DIMS)],
        ("stage_of", _ptr),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("act", ctypes.c_int64),
        ("ropes", ctypes.c_int64),
        ("embed_scale", ctypes.c_float),
        ("final_softcap", ctypes.c_float),
        ("rotation", _ptr),
        ("embed", Weight),
        ("embed_div", _ptr),
        ("final_norm", _ptr),
        ("lm_head", Weight),
        ("layer", ctypes.POINTER(Layer)),
        ("work", _ptr),
    ]


def bf16_weight(t: torch.Tensor) -> Weight:
    """A descriptor for bf16 rows [rows, k] (the caller keeps `t` alive)."""
    rows, k = t.shape
    return Weight(t.data_ptr(), None, None, rows, k, 16, k, 16)


def library(needs_bf16: bool, needs_int: bool, require_fast: bool) -> tuple[ctypes.CDLL | None, str]:
    """(the built kernel, signatures declared, and what it is), or (None, why not). `require_fast`: only
    where the CPU has the vector paths the model's weights need (AVX512-BF16 for bf16 rows, AVX512-VNNI
    for int4/int8 codes); the portable loops are slower than PyTorch's kernels."""
    lib = load_kernel(KERNEL)
    if lib is None:
        return None, kernel_unavailable_reason(KERNEL) or "the C kernel could not be built"
    _declare(lib)
    missing = []
    if needs_bf16 and not lib.slim_fast_path():
        missing.append("AVX512-BF16")
    if needs_int and not lib.slim_quant_fast_path():
        missing.append("AVX512-VNNI")
    if not missing:
        return lib, "C kernel"
    if require_fast:
        return (
            None,
            f"this CPU has no {' or '.join(missing)}, which the C kernel's fast path needs "
            "(--decode-kernel c forces it)",
        )
    return lib, "C kernel (portable)"


def any_library() -> ctypes.CDLL:
    """The library in whatever build this machine has (the PyTorch path's quantized linears run on it)."""
    lib, why = library(False, False, False)
    if lib is None:
        raise RuntimeError(f"the C kernel is unavailable: {why}")
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    lib.slim_fast_path.argtypes = []
    lib.slim_fast_path.restype = ctypes.c_int
    lib.slim_quant_fast_path.argtypes = []
    lib.slim_quant_fast_path.restype = ctypes.c_int
    lib.slim_work_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int64]
    lib.slim_work_floats.restype = ctypes.c_int64
    lib.slim_decode.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, *[_ptr] * 5, ctypes.c_int64, _ptr]
    lib.slim_decode.restype = ctypes.c_int
    lib.slim_linear.argtypes = [ctypes.POINTER(Weight), _ptr, ctypes.c_int64, *[_ptr] * 5, ctypes.c_int64]
    lib.slim_linear.restype = None
    lib.slim_linear_bf16.argtypes = [
        ctypes.POINTER(Weight),
        _ptr,
        ctypes.c_int64,
        *[_ptr] * 7,
        ctypes.c_int64,
    ]
    lib.slim_linear_bf16.restype = None
    lib.slim_embed.argtypes = [ctypes.POINTER(Weight), _ptr, ctypes.c_int64, _ptr, _ptr]
    lib.slim_embed.restype = None
