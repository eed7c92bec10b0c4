"""Model families: the names slimlm runs and how HF configs and GGUF files spell them (torch-free).

A new family adds its spellings here, its layer in slimlm/models/, and its kernel fields in
slimlm/kernels/family.py (docs/ARCHITECTURE.md: how to add a model family)."""

# HF `architectures[0]` / GGUF `general.architecture` -> our model family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
}
# HF `model_type` -> family, for configs without `architectures`.
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma3_text": "gemma3",
}
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
}
FAMILIES = tuple(dict.fromkeys(SUPPORTED_ARCHITECTURES.values()))
