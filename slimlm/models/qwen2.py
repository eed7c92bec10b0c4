"""Qwen2 / Qwen2.5: the Llama decoder with biases on q/k/v (`config.attention_bias`)."""

from slimlm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Identical to Llama apart from qkv biases, which ModelConfig turns on for the qwen2 family."""
