"""Model configuration: one validated dataclass built from HF config.json or GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError

# HF `architectures[0]` / GGUF `general.architecture` -> our model family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class RopeScaling:
    """RoPE scaling as in HF `rope_scaling` (linear, dynamic NTK-aware, Llama-3 style)."""

    rope_type: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise SlimlmError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise SlimlmError(f"rope_scaling factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        return cls(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        )

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "type": self.rope_type, "factor": self.factor}
        if self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            d["low_freq_factor"] = self.low_freq_factor
            d["high_freq_factor"] = self.high_freq_factor
        return d


@dataclass
class ModelConfig:
    """Everything the model code, the engine and the planner need to know about a model."""

    family: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias (Qwen2)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"
    quantization: dict[str, Any] | None = None  # quantization section of a slimlm/AutoAWQ/GPTQ checkpoint

    def __post_init__(self) -> None:
        if self.family not in GGUF_ARCHITECTURES.values():
            raise SlimlmError(
                f"unsupported model family {self.family!r}; supported: {', '.join(sorted(set(GGUF_ARCHITECTURES.values())))}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SlimlmError(f"config {name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise SlimlmError("config hidden_size must be divisible by num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise SlimlmError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise SlimlmError(f"head_dim must be even for RoPE, got {self.head_dim}")

    # ---- derived sizes (used by the engine and the planner) ----
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Exact parameter count of the model as slimlm builds it."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return layers * per_layer + embed + head + h

    # ---- constructors ----
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        family = None
        for arch in archs:
            family = SUPPORTED_ARCHITECTURES.get(arch)
            if family:
                break
        if family is None:
            family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(d.get("model_type", ""))
        if family is None:
            name = archs[0] if archs else d.get("model_type", "<none>")
            raise SlimlmError(
                f"unsupported architecture {name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise SlimlmError(f"config.json is missing required keys: {', '.join(missing)}")
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # Mistral/Qwen2 configs carry sliding_window but only use it when enabled.
        sliding = d.get("sliding_window")
        if family == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        rope_params = d.get("rope_scaling") or d.get("rope_parameters")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
            rope_theta = d["rope_parameters"].get("rope_theta")
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=RopeScaling.from_hf(rope_params),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", family == "qwen2")),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            quantization=d.get("quantization_config") or d.get("quantization"),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SlimlmError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise SlimlmError(f"{path} is not text (binary or corrupt); re-download or re-save it") from None
        if not isinstance(d, dict):
            raise SlimlmError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "torch_dtype": self.torch_dtype,
            "hidden_act": "silu",
        }
        if self.family != "llama":
            d["sliding_window"] = self.sliding_window
            if self.family == "qwen2":
                d["use_sliding_window"] = self.sliding_window is not None
        if self.quantization:
            d["quantization_config"] = self.quantization
        return d
