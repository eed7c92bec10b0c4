"""slimlm's numpy GGUF dequantizers against the `gguf` package's reference `gguf.quants.dequantize`,
and the loader's error for a type it cannot read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.loading import gguf_kquants

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def _random_blocks(qtype, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every field (all bit patterns of the codes, scales and mins), with the fp16
    scale fields set to finite values so both sides compute numbers, not NaN."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, size), dtype=np.uint8)
    f16_offsets = {
        T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
        T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    }[qtype]  # fmt: skip
    for off in f16_offsets:
        scales = rng.uniform(-0.1, 0.1, size=raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * size)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_the_gguf_reference(qtype):
    raw = _random_blocks(qtype, rows=6, blocks_per_row=3)
    ours = gguf_kquants.dequantize(raw, int(qtype))
    ref = gguf.quants.dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_real_quantized_values_round_trip_through_both():
    """Blocks the gguf package quantizes itself (the types it can write), dequantized by both."""
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        raw = gguf.quants.quantize(x, qtype)
        np.testing.assert_array_equal(
            gguf_kquants.dequantize(raw, int(qtype)), gguf.quants.dequantize(raw, qtype)
        )


def test_unreadable_tensor_type_names_the_type(tmp_path):
    """A tensor in a type neither slimlm nor the gguf package dequantizes (Q8_K): the error names it."""
    from slimlm.loading.gguf_file import GGUFFile, GGUFTensor

    path = tmp_path / "q8k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_K]
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, size), np.uint8), raw_dtype=T.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(path) as file:
        info = file.tensors[0]
        assert info.shape == (2, block)
        with pytest.raises(SlimlmError, match="Q8_K"):
            GGUFTensor(file, info).copy_to(torch.empty(2, block))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0], ids=lambda t: t.name)
def test_native_groups_hold_the_blocks_exactly(qtype):
    """`--weights native`: Q4_K as int4 and Q5_0 as int8 codes with a scale and minimum per 32, packed in
    the kernel's layout and read back, give gguf's own dequantized values."""
    from slimlm.kernels.qweights import pack, unpack
    from slimlm.loading.gguf_native import block_codes

    raw = _random_blocks(qtype, rows=16, blocks_per_row=2 if qtype == T.Q4_K else 16)
    codes, d, m, bits = block_codes(raw, int(qtype))
    assert bits == (4 if qtype == T.Q4_K else 8)
    codes, d, m = unpack(pack(codes, d, m, bits, 32))[:3]
    values = d.repeat_interleave(32, dim=1) * codes.float() + m.repeat_interleave(32, dim=1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    torch.testing.assert_close(values, ref, rtol=1e-6, atol=1e-6)
