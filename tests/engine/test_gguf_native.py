"""`--weights native`: GGUF Q4_0 / Q4_1 / Q8_0 blocks run on the C kernel as they are, against a float32
run of the same file dequantized by slimlm's own (transformers-checked) GGUF loader."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimlm.engine.backend import choose_backend
from slimlm.engine.config import EngineConfig
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.kernels import build
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.kv.paged import PagedKVCache
from slimlm.loading import load
from tests.engine.test_decode_kernel_quant import incremental_logits

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)
gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 128, 256, 4, 2, 2
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip


def _file_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's Q/K rows -> llama.cpp's order (convert_hf_to_gguf's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_model(path, linear_type, embed_type, tied=True, odd=None):
    """A random Llama-arch GGUF with a small byte-level tokenizer; `odd`: (GGUF name, type) overrides."""
    from tests.tokenizer_cases import SYNTHETIC

    fields = SYNTHETIC["qwen2"]()
    vocab = len(fields["tokenizer.ggml.tokens"])
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.08):
        return (torch.randn(*shape, generator=gen) * scale).numpy().astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in {"block_count": LAYERS, "context_length": 64, "embedding_length": HIDDEN,
                       "feed_forward_length": INTER, "attention.head_count": HEADS,
                       "attention.head_count_kv": KV_HEADS}.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)

    def add(name, w, qtype):
        qtype = dict(odd or {}).get(name, qtype)
        if qtype == T.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    add("token_embd.weight", rand(vocab, HIDDEN, scale=0.5), embed_type)
    add("output_norm.weight", 1 + rand(HIDDEN), T.F32)
    if not tied:
        add("output.weight", rand(vocab, HIDDEN), embed_type)
    d = HIDDEN // HEADS
    shapes = {"q_proj": (HEADS * d, HIDDEN), "k_proj": (KV_HEADS * d, HIDDEN), "v_proj": (KV_HEADS * d, HIDDEN),
              "o_proj": (HIDDEN, HEADS * d), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
              "down_proj": (HIDDEN, INTER)}  # fmt: skip
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", 1 + rand(HIDDEN), T.F32)
        add(f"blk.{i}.ffn_norm.weight", 1 + rand(HIDDEN), T.F32)
        for hf, name in NAMES.items():
            w = rand(*shapes[hf])
            if hf in ("q_proj", "k_proj"):
                w = _file_rows(w, HEADS if hf == "q_proj" else KV_HEADS)
            add(f"blk.{i}.{name}.weight", w, linear_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "linear_type,embed_type,tied",
    [(T.Q4_1, T.Q8_0, True), (T.Q4_0, T.Q8_0, False), (T.Q8_0, T.Q4_1, True), (T.Q5_0, T.Q5_0, True)],
)
def test_native_blocks_match_a_float32_run_of_the_dequantized_file(tmp_path, linear_type, embed_type, tied):
    path = write_model(tmp_path / "tiny.gguf", linear_type, embed_type, tied)
    check_native_run(path)


def test_q5_0_beside_a_q8_0_part_goes_to_int8_exactly(tmp_path):
    """Gemma 3's Q4_K_M has q/k Q5_0 with a Q8_0 v in half its layers: the kernel fuses q/k/v, so there
    the Q5_0 parts are widened to int8 g32 (exact) instead of dequantized."""
    path = write_model(tmp_path / "mixed.gguf", T.Q5_0, T.Q8_0, odd={"blk.1.attn_v.weight": T.Q8_0})
    model = check_native_run(path)
    assert model.model.layers[1].self_attn.qkv_proj.kernel_weight().describe() == "int8 g32"
    assert model.model.layers[0].self_attn.qkv_proj.kernel_weight().describe() == "q5_0 g32"


@pytest.mark.parametrize("embed_type", [T.Q8_0, T.Q4_1, T.Q4_0])
def test_a_tall_table_unpacked_in_row_blocks_is_the_same_bytes(tmp_path, monkeypatch, embed_type):
    """Vocab-sized tables are unpacked TABLE_BLOCK_ROWS at a time (peak memory); the blocks, the last
    one partial, must give exactly the layout of the whole table packed at once."""
    import slimlm.loading.gguf_native as native

    path = write_model(tmp_path / "t.gguf", T.Q4_1, embed_type, tied=False)
    whole = load(str(path), dtype="bfloat16", weights="native", progress=False).model
    monkeypatch.setattr(native, "TABLE_BLOCK_ROWS", 48)
    blocks = load(str(path), dtype="bfloat16", weights="native", progress=False).model
    assert whole.config.vocab_size % 48 != 0  # a partial last block
    for get in (lambda m: m.model.embed_tokens.table.kernel_weight(), lambda m: m.lm_head.kernel_weight()):
        a, b = get(whole), get(blocks)
        assert (a.rows, a.k, a.bits, a.group) == (b.rows, b.k, b.bits, b.group)
        assert torch.equal(a.codes, b.codes) and a.scales.dtype == b.scales.dtype
        assert torch.equal(a.scales, b.scales)


def check_native_run(path):
    reference = load(str(path), dtype="float32", progress=False).model
    native = load(str(path), dtype="bfloat16", weights="native", progress=False)
    model = native.model
    assert isinstance(model.model.embed_tokens, KernelEmbedding) and isinstance(model.lm_head, KernelLinear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, KernelLinear) and not native.notes
    # exactly the file's weights: the Q/K rows un-permuted like the float loader's
    qkv = model.model.layers[1].self_attn.qkv_proj.dequantized_weight()
    attn = reference.model.layers[1].self_attn
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4, dtype=torch.bfloat16)
    cache.prepare_blocks(range(8))
    backend = choose_backend(model, cache, EngineConfig(), max_ctx=32)
    assert backend.decoder is not None, backend.description
    tokens = torch.randint(
        0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    fused = torch.cat([backend.decoder.decode([t], [p], [[5, 1, 6, 0]]) for p, t in enumerate(tokens)])
    expected = incremental_logits(reference, tokens)
    # int8 activations (per 32) are a little noisier than bf16 ones: within 2x PyTorch's bf16 path
    bf16_err = (
        (incremental_logits(copy.deepcopy(reference).to(torch.bfloat16), tokens) - expected).abs().max()
    )
    err = (fused - expected).abs().max()
    assert err < min(0.03 * expected.abs().max(), 2 * bf16_err)
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err  # random tiny models have near-ties; those may flip
    assert clear.sum() >= len(tokens) // 2
    assert torch.equal(fused.argmax(-1)[clear], expected.argmax(-1)[clear])
    return model


def test_types_without_a_native_path_are_dequantized_with_a_note(tmp_path):
    path = write_model(tmp_path / "mixed.gguf", T.Q4_1, T.Q8_0, odd={"blk.0.ffn_down.weight": T.Q5_1,
                                                                      "blk.1.attn_v.weight": T.Q5_1})  # fmt: skip
    llm = LLM(
        str(path), dtype="bfloat16", device="cpu", weights="native", kv_cache_tokens=256, progress=False
    )
    model = llm.loaded.model
    assert type(model.model.layers[0].mlp.down_proj) is not KernelLinear  # dequantized, float
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, KernelLinear)
    assert (
        type(model.model.layers[1].self_attn.qkv_proj) is not KernelLinear
    )  # q/k/v fused only if all native
    report = llm.memory_report_text()
    assert (
        "note: GGUF tensors without a native kernel path dequantized to bfloat16: 2 Q4_1, 2 Q5_1" in report
    )  # q, k go with v
    assert llm.engine.decode_backend == "C kernel"  # mixed bf16 rows and int4 codes in one step
    reference = LLM(str(path), dtype="bfloat16", device="cpu", kv_cache_tokens=256, progress=False,
                    decode_kernel="torch")  # fmt: skip
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = [5, 77, 300, 12]
    got = llm.generate([prompt], params)[0].token_ids
    assert len(got) == 12 and got[:4] == reference.generate([prompt], params)[0].token_ids[:4]


def test_bad_weights_choice_is_one_line():
    with pytest.raises(SlimlmError, match="unknown --weights 'int3'; choose one of float, native"):
        load(None, weights="int3")
