"""The Llama decoder (Llama 2/3, SmolLM2). Mistral and Qwen2 reuse it with their own flags.

Parameter names follow HF exactly so checkpoints (HF, AutoAWQ, GPTQ, PEFT) map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.config import ModelConfig
from slimlm.kv.metadata import AttnMetadata
from slimlm.models.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), bit for bit: F.rms_norm computes
        # in float32 for bf16/fp16 inputs and rounds once, in one call instead of eight small ops.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # HF's "gelu_pytorch_tanh"


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by prepare_linears: one matmul for both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # set by prepare_linears: one matmul for q, k and v

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """-> q, k and v side by side: [T, (H + 2 KVH) * D]."""
        if self.qkv_proj is None:
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return self.qkv_proj(x)

    def _qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """q and k heads [T, H + KVH, D] as RoPE takes them; families with q/k norms apply them here."""
        return qkv[:, : self.num_heads + self.num_kv_heads]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, meta: AttnMetadata
    ) -> torch.Tensor:
        t, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self._project(x).view(t, h + 2 * kvh, self.head_dim)
        qk = apply_rotary(self._qk(qkv), cos, sin)  # q and k turned in one go
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh :]  # [T, H, D], [T, KVH, D], [T, KVH, D]
        out = cache.attend(self.layer_idx, q, k, v, meta)  # [T, H, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    attention_class: type[Attention] = Attention  # families swap in their own attention / MLP
    mlp_class: type[MLP] = MLP

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = self.mlp_class(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, meta: AttnMetadata
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, layer_class: type[nn.Module] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """Flat-batch causal LM: forward(input_ids[T], positions[T], cache, meta) -> hidden[T, hidden]."""

    layer_class: type[nn.Module] = DecoderLayer  # what each family changes inside a layer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_class)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute the non-persistent buffers (RoPE frequencies) on `device`; checkpoints do not hold them."""
        self.model.rotary_emb = RotaryEmbedding(self.config, device=device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache, meta: AttnMetadata
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.model.rotary_emb(
            positions, x.dtype, _dynamic_scale_lens(self.config, meta, positions)
        )
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without a cache: input_ids [B, S] -> logits [B, S, vocab] (training, ppl)."""
        from slimlm.kv.dense import DenseAttention

        b, s = input_ids.shape
        meta = AttnMetadata(query_lens=[s] * b, context_lens=[s] * b)
        positions = torch.arange(s, device=input_ids.device).repeat(b)
        hidden = self.forward(input_ids.reshape(-1), positions, DenseAttention(self.config), meta)
        return self.compute_logits(hidden).view(b, s, -1)


def _dynamic_scale_lens(
    config: ModelConfig, meta: AttnMetadata, positions: torch.Tensor
) -> torch.Tensor | None:
    """For dynamic NTK and longrope: every token of a sequence uses the length its sequence has after this step."""
    if config.rope_scaling is None or config.rope_scaling.rope_type not in ("dynamic", "longrope"):
        return None
    lens = torch.tensor(meta.context_lens, device=positions.device)
    return torch.repeat_interleave(lens, torch.tensor(meta.query_lens, device=positions.device))
