"""`slimlm quantize` of a bf16 checkpoint with plain RTN loads it in bf16 (half the memory of a float32
load: 9.1 -> 5.9 GB peak for SmolLM2-1.7B's shape) and writes the same codes and scales as quantizing a
float32 load of it (the reference: quantize_model on the float32 model, as before the change)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from slimlm.bench.models import build_synthetic
from slimlm.cli import main
from slimlm.commands.quantize import _stored_dtypes
from slimlm.loading import load
from slimlm.quant.format import quantized_state_dict
from slimlm.quant.quantize import quantize_model
from tests.test_synthetic_model import TINY


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32)])
def test_bf16_source_quantizes_to_the_float32_loads_codes(tmp_path, bits, group):
    src = build_synthetic(tmp_path / "src", TINY, seed=1)
    assert _stored_dtypes(str(src)) == {"BF16"}
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--bits", str(bits),
                 "--group-size", str(group), "--out", str(out), "-q"]) == 0  # fmt: skip
    reference = load(str(src), dtype="float32", progress=False).model
    quantize_model(reference, "rtn", bits, group, progress=False)
    expected = quantized_state_dict(reference)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(expected)
        for name in f.keys():
            got, want = f.get_tensor(name), expected[name]
            if want.is_floating_point():  # norms (and w8's float table): the source's bf16 values
                assert torch.equal(got.float(), want.float()), name
            else:
                assert torch.equal(got, want), name
    assert _stored_dtypes(None) == set()  # the embedded GGUF: loaded in float32 as before
