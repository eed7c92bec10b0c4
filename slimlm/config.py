"""Model configuration: one validated dataclass built from HF config.json or GGUF metadata."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.formats.families import FAMILIES, MODEL_TYPES, SUPPORTED_ARCHITECTURES

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
SLIDING, FULL = "sliding_attention", "full_attention"


def read_json_file(path: Path, fix: str = "re-download or re-save it") -> Any:
    """The JSON in `path`, or one clear error for invalid JSON or a binary file (`fix`: what to do then)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise SlimlmError(f"{path} is not text (binary or corrupt); {fix}") from None


@dataclass
class RopeScaling:
    """RoPE scaling as in HF `rope_scaling` (linear, dynamic NTK-aware, Llama-3 style, Phi-3 longrope/su)."""

    rope_type: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # longrope: per-frequency divisors below / above the original length, and the cos/sin multiplier
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise SlimlmError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise SlimlmError(f"rope_scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "longrope" and not (
            self.short_factor and self.long_factor and self.original_max_position_embeddings
        ):
            raise SlimlmError(
                "longrope rope_scaling needs short_factor, long_factor and original_max_position_embeddings"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None, top: dict[str, Any] | None = None) -> RopeScaling | None:
        """`top`: the whole config.json, for keys Phi-3 keeps beside `rope_scaling`."""
        if not d:
            return None
        top = top or {}
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type in ("su", "yarn") and top.get("model_type") == "phi3":
            rope_type = "longrope"  # Phi-3's old names for the same scaling (HF renames them too)
        if rope_type == "default":
            return None
        orig = d.get("original_max_position_embeddings") or top.get("original_max_position_embeddings")
        factor = d.get("factor")
        if rope_type == "longrope":
            attention_factor = d.get("attention_factor")
            if factor is None:  # Phi-3: the ratio of the two lengths (as HF computes it)
                factor = top.get("max_position_embeddings", orig) / orig
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            return cls(rope_type, float(factor), orig, short_factor=list(d["short_factor"]),
                       long_factor=list(d["long_factor"]), attention_factor=float(attention_factor))  # fmt: skip
        return cls(
            rope_type=rope_type,
            factor=float(1.0 if factor is None else factor),
            original_max_position_embeddings=orig,
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
        if self.rope_type == "longrope":
            d.update(short_factor=self.short_factor, long_factor=self.long_factor,
                     attention_factor=self.attention_factor)  # fmt: skip
        return d


@dataclass
class ModelConfig:
    """Everything the model code, the engine and the planner need to know about a model."""

    family: str  # one of FAMILIES
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
    # ---- family features (defaults are the Llama family's) ----
    hidden_act: str = "silu"  # MLP gate activation: "silu" or "gelu_pytorch_tanh" (Gemma's GeGLU)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    layer_types: list[str] | None = None  # per layer SLIDING or FULL; None: `sliding_window` for all
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3), else rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma), else head_dim
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SlimlmError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise SlimlmError(
                f"unsupported hidden activation {self.hidden_act!r}; supported: {', '.join(HIDDEN_ACTS)}"
            )
        if self.layer_types is not None:
            bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise SlimlmError(
                    f"config layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                    f"{self.num_hidden_layers} layers, got {len(self.layer_types)} entries {bad or ''}"
                )
        if self.attention_bias and self.family in ("qwen3", "phi3", "gemma3"):
            raise SlimlmError(f"attention_bias is not supported for {self.family} checkpoints")
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

    @property
    def attn_scale(self) -> float:
        """The factor on q·k: head_dim ** -0.5, or query_pre_attn_scalar ** -0.5 where the config sets it."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """How far back layer `layer` attends: the sliding window, or None for full attention."""
        if self.layer_types is not None and self.layer_types[layer] == FULL:
            return None
        return self.sliding_window

    def num_parameters(self) -> int:
        """Exact parameter count of the model as slimlm builds it."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        norms = 4 if self.family == "gemma3" else 2  # Gemma 3 also norms the sublayers' outputs
        per_layer = attn + 3 * h * i + norms * h
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
        if family is None and not archs:
            family = MODEL_TYPES.get(d.get("model_type", ""))
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
        extra = _family_fields(family, d)
        rope_params = d.get("rope_scaling") or d.get("rope_parameters")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
            rope_theta = d["rope_parameters"].get("rope_theta")
        if family == "gemma3":
            rope_params, rope_theta = _gemma3_rope(d, extra)
        elif isinstance(rope_params, dict) and rope_params.get("partial_rotary_factor", 1.0) != 1.0:
            raise SlimlmError("partial_rotary_factor below 1 (RoPE on part of each head) is not supported")
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or (256 if family == "gemma3" else 0),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=RopeScaling.from_hf(rope_params, d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", family == "gemma3")),
            attention_bias=bool(d.get("attention_bias", family == "qwen2")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            quantization=d.get("quantization_config") or d.get("quantization"),
            hidden_act=str(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
            **extra,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        d = read_json_file(path)
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
        }
        d["hidden_act"] = self.hidden_act
        if self.family != "llama":
            d["sliding_window"] = self.sliding_window
            if self.family in ("qwen2", "qwen3"):
                d["use_sliding_window"] = self.sliding_window is not None
        if self.layer_types is not None:
            d["layer_types"] = self.layer_types
        if self.family == "phi3" and self.rope_scaling and self.rope_scaling.rope_type == "longrope":
            d["original_max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
        if self.family == "gemma3":
            d["model_type"] = "gemma3_text"
            d["hidden_activation"] = d.pop("hidden_act")
            d["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            d["attn_logit_softcapping"] = self.attn_logit_softcapping
            d["final_logit_softcapping"] = self.final_logit_softcapping
            d["rope_local_base_freq"] = self.rope_local_theta
        if self.quantization:
            d["quantization_config"] = self.quantization
        return d


def _family_fields(family: str, d: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields beyond the Llama family's that `family` reads from config.json `d`."""
    sliding = d.get("sliding_window")
    layer_types = d.get("layer_types")
    if family in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        sliding, layer_types = None, None  # Qwen configs carry a window but only use it when enabled
    if family in ("llama", "qwen2"):
        layer_types = None
    out: dict[str, Any] = {"sliding_window": sliding, "layer_types": layer_types}
    if family == "qwen3":
        out["qk_norm"] = True
    if family == "gemma3":
        if d.get("use_bidirectional_attention"):
            raise SlimlmError("Gemma 3 with bidirectional attention (an encoder) is not a causal LM")
        pattern = d.get("sliding_window_pattern", 6)
        if layer_types is None:  # older configs: every `pattern`-th layer is global
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(d["num_hidden_layers"])]
        out.update(
            sliding_window=d.get("sliding_window", 4096),
            layer_types=list(layer_types),
            qk_norm=True,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            # Not applied: transformers' Gemma3 attention never passes it on, nor does llama.cpp's
            # gemma3 graph (Gemma 2 used it); matching them is what makes a Gemma 3 checkpoint run right.
            attn_logit_softcapping=None,
            final_logit_softcapping=d.get("final_logit_softcapping"),
        )
    return out


def _gemma3_rope(d: dict[str, Any], extra: dict[str, Any]) -> tuple[dict | None, float]:
    """Gemma 3's two RoPE setups -> (scaling of the global layers, their base); sets the local base."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):  # transformers >= 5 layout
        full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
        if local.get("rope_type", "default") != "default":
            raise SlimlmError("RoPE scaling on Gemma 3's sliding layers is not supported")
        extra["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
        return full, float(full.get("rope_theta", 1_000_000.0))
    extra["rope_local_theta"] = float(d.get("rope_local_base_freq", 10000.0))
    return d.get("rope_scaling") or params, float(d.get("rope_theta", 1_000_000.0))
