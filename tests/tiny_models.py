"""Tiny random HF models per architecture: the reference implementations for parity tests."""

from __future__ import annotations

import torch

from slimlm.config import ModelConfig
from slimlm.models import build_model

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "llama-dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    ),
    "llama-llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "max_position_embeddings": 64,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}

# The families beyond Llama's, with their awkward settings: one KV head, head_dim != hidden / heads,
# Phi-3's longrope past its original length, Gemma 3's head_dim 256, a window shorter than the prompts,
# both soft-cappings and an attention scale that is not head_dim ** -0.5.
_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.05 * i for i in range(8)],
    "long_factor": [1.0 + 0.4 * i for i in range(8)],
}
FAMILY_ARCHS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 1, "head_dim": 32}),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_scaling": _LONGROPE,
            "pad_token_id": 0,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "query_pre_attn_scalar": 64,
            "final_logit_softcapping": 0.5,  # below the logits' size, so it bites
            "attn_logit_softcapping": 50.0,
            "pad_token_id": 0,
        },
    ),
    # As the released Gemma 3 configs: no soft-capping, scale 1/sqrt(head_dim), five local layers a global.
    "gemma3-plain": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "sliding_window": 6,
            "query_pre_attn_scalar": 32,
            "pad_token_id": 0,
        },
    ),
}


def make_hf_model(arch: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch] if arch in ARCHS else FAMILY_ARCHS[arch]
    hf_config = getattr(transformers, config_cls)(**{**BASE, **extra})
    if arch == "mistral" or arch in FAMILY_ARCHS:
        # sdpa ignores the sliding window in some versions, and soft-capping in all
        hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config).eval()
    if arch in FAMILY_ARCHS:  # norms start at the identity: perturb them so parity tests see them
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
    return model


def slimlm_from_hf(hf_model, dtype=torch.float32):
    config = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    model = build_model(config, dtype)
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model


def cached_decode_logits(
    hf_model, model, ids: torch.Tensor, prompt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slimlm's, transformers') logits for ids[0]: `prompt` tokens prefilled, then one token a step,
    each side through its own KV cache (slimlm's ContiguousKVCache, transformers' past_key_values)."""
    from slimlm.kv.contiguous import ContiguousKVCache
    from slimlm.kv.metadata import AttnMetadata

    seq = ids.shape[1]
    cache = ContiguousKVCache(model.config, 1, seq)
    with torch.no_grad():
        first = hf_model(ids[:, :prompt], use_cache=True)
        past, refs = first.past_key_values, [first.logits[0]]
        meta = AttnMetadata.single(prompt, prompt)
        outs = [model.compute_logits(model(ids[0, :prompt], torch.arange(prompt), cache, meta))]
        for t in range(prompt, seq):
            step = hf_model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            refs.append(step.logits[0])
            hidden = model(ids[0, t : t + 1], torch.tensor([t]), cache, AttnMetadata.single(1, t + 1))
            outs.append(model.compute_logits(hidden))
    return torch.cat(outs), torch.cat(refs)


def paged_decode_logits(model, cache, tokens: list[int], table: list[int], start: int = 0) -> torch.Tensor:
    """slimlm's eager logits [len - start, vocab], one token a step through `cache.attend` (any paged pool)
    with the sequence's blocks at `table`, from position `start` on (the earlier ones already in `cache`)."""
    from slimlm.kv.metadata import AttnMetadata

    bs, rows = cache.block_size, []
    with torch.inference_mode():
        for pos, token in enumerate(tokens[start:], start):
            meta = AttnMetadata(
                query_lens=[1],
                context_lens=[pos + 1],
                block_tables=torch.tensor([table]),
                slot_mapping=torch.tensor([table[pos // bs] * bs + pos % bs]),
            )
            rows.append(
                model.compute_logits(model(torch.tensor([token]), torch.tensor([pos]), cache, meta))[0]
            )
    return torch.stack(rows)
