"""Qwen3 and Gemma 3 from GGUF: tiny random HF models written out as llama.cpp's converter writes them
(its tensor names, Gemma's norms stored as 1 + w, no Q/K permutation outside the llama arch; a Q8_0
tensor among the F32 ones), loaded by slimlm and compared with the HF model they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.loading import load
from tests.tiny_models import make_hf_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}  # fmt: skip
_LLAMA_NORMS = {"post_attention_layernorm": "ffn_norm"}
_GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(hf_name: str, arch: str) -> str | None:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    names = {**_NAMES, **(_GEMMA_NORMS if arch == "gemma3" else _LLAMA_NORMS)}
    return f"blk.{layer}.{names[module]}.{suffix}"


def _write(path, hf, arch: str) -> None:
    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        "block_count": c.num_hidden_layers, "context_length": 64, "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads, "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
    }.items():  # fmt: skip
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_float32(
        f"{arch}.rope.freq_base", c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"]
    )
    if arch == "gemma3":
        writer.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
    # A SentencePiece vocabulary of 128 pieces: the ids are all these tests use.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"▁t{i}" for i in range(124)]
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [-float(i) for i in range(128)])
    writer.add_array("tokenizer.ggml.token_type", [3, 3, 3, 2] + [1] * 124)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    for name, tensor in hf.state_dict().items():
        if "rotary" in name or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        data = tensor.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's converter stores Gemma's (1 + w)
        if name.endswith("mlp.down_proj.weight") and name.startswith("model.layers.0."):
            writer.add_tensor(_gguf_name(name, arch), gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
            tensor.copy_(torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
            )))  # fmt: skip  # the reference holds the same rounded values
        else:
            writer.add_tensor(_gguf_name(name, arch), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,tiny", [("qwen3", "qwen3"), ("gemma3", "gemma3-plain")])
def test_gguf_loads_and_matches_the_hf_model(tmp_path, arch, tiny):
    hf = make_hf_model(tiny)
    path = tmp_path / f"{arch}.gguf"
    with torch.no_grad():
        _write(path, hf, arch)
    loaded = load(str(path), dtype="float32", progress=False)
    assert loaded.config.family == arch
    ids = torch.randint(4, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.forward_dense(ids), hf(ids).logits, rtol=0, atol=1e-4)
