"""Gemma 3 (text): the Llama decoder reshaped.

- token embeddings multiplied by sqrt(hidden_size) (in the weights' dtype, as HF does);
- RMSNorm with (1 + w), computed in float32 and rounded once at the end (HF's Gemma3RMSNorm);
- four norms per layer: before and after attention, before and after the MLP;
- GeGLU: the gate through tanh-approximated GELU (config.hidden_act);
- q/k RMSNorm per head before RoPE;
- sliding-window and global layers interleaved (config.layer_types), each kind with its own RoPE base:
  the caches look the window up per layer (config.layer_window), and each layer picks its cos/sin pair;
- attention scale query_pre_attn_scalar ** -0.5 and optional attention soft-capping (the caches read
  both from the config), optional final-logit soft-capping (compute_logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.config import SLIDING, ModelConfig
from slimlm.kv.metadata import AttnMetadata
from slimlm.models.llama import MLP, Attention, LlamaForCausalLM, _dynamic_scale_lens
from slimlm.models.rope import RotaryEmbedding


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in float32; the weight starts at zero (the identity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)

    @torch.no_grad()
    def divide_output(self, scale: torch.Tensor) -> None:
        """Outputs / scale (AWQ folding): the effective multiplier is 1 + w, so w <- (1 + w) / s - 1."""
        self.weight.copy_((1.0 + self.weight.float()) / scale.float() - 1.0)


class Gemma3Attention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps)

    def _qk(self, qkv: torch.Tensor) -> torch.Tensor:
        h, kvh = self.num_heads, self.num_kv_heads
        return torch.cat([self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h : h + kvh])], dim=1)


class Gemma3DecoderLayer(nn.Module):
    # AWQ (quant/awq.py): the MLP reads pre_feedforward_layernorm; post_attention_layernorm norms the
    # attention output, so folding into it (the Llama grouping) would be wrong.
    awq_scale_groups = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    )

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_sliding = config.layer_types is not None and config.layer_types[layer_idx] == SLIDING
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = MLP(config)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Gemma3RMSNorm(h, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(h, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(h, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, cos: tuple, sin: tuple, cache, meta: AttnMetadata) -> torch.Tensor:
        """cos / sin: (global, local) pairs; the layer takes the one of its kind."""
        i = 1 if self.is_sliding else 0
        attn = self.self_attn(self.input_layernorm(x), cos[i], sin[i], cache, meta)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)  # global layers
        self.rotary_local = RotaryEmbedding(config, local=True)  # sliding layers


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Parameter names as HF's Gemma3ForCausalLM (text-only)."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = Gemma3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device: torch.device | str) -> None:
        self.model.rotary_emb = RotaryEmbedding(self.config, device=device)
        self.model.rotary_local = RotaryEmbedding(self.config, device=device, local=True)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache, meta: AttnMetadata
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype.
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        lens = _dynamic_scale_lens(self.config, meta, positions)
        cos_g, sin_g = self.model.rotary_emb(positions, x.dtype, lens)
        cos_l, sin_l = self.model.rotary_local(positions, x.dtype)
        cos, sin = (cos_g, cos_l), (sin_g, sin_l)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
