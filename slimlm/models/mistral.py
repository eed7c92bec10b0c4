"""Mistral: the Llama decoder with sliding-window attention (handled by the attention masks)."""

from slimlm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Identical weights to Llama; `config.sliding_window` limits how far back attention looks."""
