"""Phi-3: the Llama decoder with q/k/v and gate/up stored fused (`qkv_proj`, `gate_up_proj`), as in
the checkpoint, and su/longrope RoPE scaling (models/rope.py).

The fused linears are the model's own modules, so HF checkpoints, PEFT adapters (target `qkv_proj`,
`gate_up_proj`) and the quantizers see the names they expect; the Llama forward already takes the
fused path whenever `qkv_proj` / `gate_up_proj` are set.
"""

from __future__ import annotations

from torch import nn

from slimlm.config import ModelConfig
from slimlm.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM


class Phi3Attention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj
        # Rows: q heads, then k heads, then v heads (HF's split order).
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=False)


class Phi3MLP(MLP):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        del self.gate_proj, self.up_proj
        # Rows: gate, then up (HF's `chunk(2)` order).
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)


class Phi3DecoderLayer(DecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP
    # AWQ (quant/awq.py): the norms feed the fused projections; v -> o and up -> down are not separable.
    awq_scale_groups = (
        ("input_layernorm", ("self_attn.qkv_proj",)),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    )


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_class = Phi3DecoderLayer
