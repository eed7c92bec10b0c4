"""Quantized checkpoints loaded straight into the C kernel's layout (slimlm/loading/quantized.py, "kernel"):
the same bytes as building PyTorch's QuantLinear modules and repacking them (what the backend does for a
model passed in), no QuantLinear left behind, and a fallback to the QuantLinear form where the kernel
cannot run the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimlm.engine.backend import KEEP_LAYOUT, quantized_layout
from slimlm.engine.config import EngineConfig
from slimlm.kernels import build
from slimlm.kernels.qlayout import to_kernel_layout
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.loading.quantized import load_quantized_dir
from slimlm.quant.format import save_quantized
from slimlm.quant.linear import QuantLinear
from slimlm.quant.quantize import quantize_model
from tests.engine.test_decode_kernel_quant import incremental_logits, tiny

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)


def _checkpoint(tmp_path: Path, bits: int, group: int, tied: bool, embeddings: bool, **shape) -> Path:
    model = tiny("llama", tied, **shape)
    quantize_model(model, "rtn", bits, group, None, progress=False, quantize_embeddings=embeddings)
    quant_config = {"quant_method": "slimlm", "bits": bits, "group_size": group}
    return save_quantized(model, quant_config, tmp_path / "ckpt")


def _load(path: Path, layout: str):
    from slimlm.config import ModelConfig

    config = ModelConfig.from_json_file(path / "config.json")
    return load_quantized_dir(
        path, config, [path / "model.safetensors"], torch.bfloat16, "cpu", False, layout
    )


@pytest.mark.parametrize(("bits", "group", "tied", "embeddings"), [(4, 64, True, True), (8, -1, False, True),
                                                                   (4, 32, True, False)])  # fmt: skip
def test_kernel_layout_load_holds_the_repacked_bytes_and_no_quantlinear(
    tmp_path, bits, group, tied, embeddings
):
    path = _checkpoint(tmp_path, bits, group, tied, embeddings)
    direct = _load(path, "kernel")
    repacked = _load(path, "torch")
    assert any(isinstance(m, QuantLinear) for m in repacked.modules())
    to_kernel_layout(repacked)
    assert not any(isinstance(m, QuantLinear) for m in direct.modules())
    assert isinstance(direct.model.embed_tokens, KernelEmbedding) == embeddings
    a = dict(direct.named_buffers(remove_duplicate=False))
    b = dict(repacked.named_buffers(remove_duplicate=False))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] is None and b[name] is None or torch.equal(a[name], b[name]), name
    for (na, pa), (nb, pb) in zip(direct.named_parameters(), repacked.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    tokens = [1, 5, 9, 200, 17]  # the PyTorch path over the kernel's buffers: the same logits
    assert torch.equal(incremental_logits(direct, tokens), incremental_logits(repacked, tokens))
    assert sum(isinstance(m, KernelLinear) for m in direct.modules()) >= 4 * 2  # q/k/v, o, gate/up, down


def test_a_checkpoint_the_kernel_cannot_run_loads_as_quantlinear(tmp_path):
    path = _checkpoint(tmp_path, 8, -1, True, False, hidden=80, inter=160)  # 80 inputs: not whole 32-blocks
    model = _load(path, "kernel")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert not any(isinstance(m, KernelLinear) for m in model.modules())


def test_the_engine_asks_for_the_kernel_layout_only_where_it_would_repack():
    cpu = torch.device("cpu")
    assert quantized_layout(EngineConfig(decode_kernel="torch"), cpu, torch.bfloat16) == "torch"
    assert quantized_layout(EngineConfig(weights_layout=KEEP_LAYOUT), cpu, torch.bfloat16) == "torch"
    assert quantized_layout(EngineConfig(), cpu, torch.float32) == "torch"
    assert quantized_layout(EngineConfig(decode_kernel="c"), cpu, torch.bfloat16) == "kernel"
