"""Qwen3: the Llama decoder with an RMSNorm over every q and k head before RoPE, and no q/k/v bias."""

from __future__ import annotations

import torch

from slimlm.config import ModelConfig
from slimlm.models.llama import Attention, DecoderLayer, LlamaForCausalLM, RMSNorm


class Qwen3Attention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        # One weight of head_dim shared by every head (HF's q_norm / k_norm).
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def _qk(self, qkv: torch.Tensor) -> torch.Tensor:
        h, kvh = self.num_heads, self.num_kv_heads
        return torch.cat([self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h : h + kvh])], dim=1)


class Qwen3DecoderLayer(DecoderLayer):
    attention_class = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Parameter names as HF's Qwen3ForCausalLM (`self_attn.q_norm.weight`, ...)."""

    layer_class = Qwen3DecoderLayer
