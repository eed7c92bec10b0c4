"""Training activations of a Llama-shaped decoder (GQA, SwiGLU, RMSNorm, RoPE), from the tensors autograd saves.

Per decoder layer and per token (N = micro_batch x seq tokens; b = bytes of the compute dtype; h hidden,
i intermediate, q = heads x head_dim, kv = kv_heads x head_dim, H heads, S sequence length, r LoRA rank):

  each RMSNorm (2)   4h + 4          fp32 copy of its input (pow and mul save it) + fp32 rsqrt per token
                     + b·h           normalized input, only when the norm weight trains
  q/k/v input        b·h             when any of q/k/v trains (full) or carries LoRA
  attention, flash   b·(2q + 2kv) + 4H   SDPA saves q, k, v, its output (which is also o_proj's input:
                                     flash kernels return a [B, S, H, D] layout, so no copy) and fp32 logsumexp
  attention, eager   3·b·q + 4·H·S (+ b·H·S when b < 4)   q and K/V repeated to all heads, the fp32
                                     softmax output and its cast; + b·q o_proj input when o trains
  MLP input          b·h             when gate or up trains / carries LoRA
  SwiGLU             3·b·i           gate output (saved by SiLU), SiLU output and up output (saved by the product)
                     + b·i           the product, when down trains / carries LoRA
  LoRA               b·r             per adapted projection (A·x, saved by B)
  LoRA dropout p > 0 b·in + m·in     per adapted projection: its dropped-out input (what A saves, instead
                                     of the shared input, which then nothing saves) and, where the input
                                     needs a gradient, the mask: m = b on the CPU (dropout multiplies by a
                                     noise tensor of the input's dtype), 1 on CUDA (fused, bool mask). In
                                     the first layer of LoRA the q/k/v inputs need no gradient (no mask),
                                     nor does a later input that no adapter of that layer precedes.

Model level: the final norm (4h + 4, + b·h when it trains), the lm_head input (b·h when lm_head trains),
RoPE cos/sin (2·b·head_dim per position), int64 labels (8 per token). Logits: the forward holds
b·V logits, their fp32 copy for the loss (when b < 4) and the fp32 log-softmax (4V) the loss saves; the
backward of the log-softmax holds 12·V bytes per token (saved output, incoming and outgoing fp32 gradients).

With a chunked loss (slimlm train: chunks of 1024 loss tokens, each recomputed in its backward) only one
chunk's logits exist at a time: the logits terms count min(tokens, chunk) tokens instead of all.

Gradient checkpointing (per decoder layer) keeps only each layer's input, b·h per token, and recomputes
one layer at a time during the backward. A layer's backward works on top of what is saved with the
gradient flowing into it (b·h) and, in SwiGLU's product backward, three [N, i] gradients (b·3i), of which
one replaces the freed product when down trains. These formulas are those of slimlm's Llama and of HF
transformers' (sdpa or eager attention), which saves the same tensors. With LoRA dropout each adapter
drops out its own copy of the input (q, k and v each make one), so at slimlm train's default (0.05,
no checkpointing) the adapters' inputs are a fifth to a third of the step's peak (docs/plan.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.config import ModelConfig

ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class ActivationSetup:
    """What decides which tensors autograd keeps."""

    micro_batch: int
    seq_len: int
    compute_bytes: int  # 4 fp32, 2 bf16/fp16
    flash_attention: bool = True
    saved_inputs: frozenset[str] = frozenset()  # projections whose input is saved: they train or carry LoRA
    lora_targets: frozenset[str] = frozenset()
    lora_rank: int = 0
    lora_dropout: float = 0.0  # > 0: every adapter saves its own dropped-out input and mask
    dropout_mask_bytes: int | None = None  # per element; None: compute_bytes (the CPU's unfused dropout)
    norms_train: bool = False
    lm_head_trains: bool = False
    input_requires_grad: bool = True  # the embedding output needs a gradient (it trains)
    checkpointing: bool = False
    loss_chunk_tokens: int | None = None  # loss over chunks of this many tokens, recomputed in the backward

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def layer_saved_bytes(config: ModelConfig, a: ActivationSetup, first_layer: bool = False) -> int:
    """Bytes one decoder layer keeps for its backward (no checkpointing)."""
    h, i, q, kv, heads = (config.hidden_size, config.intermediate_size, config.q_size, config.kv_size,
                          config.num_attention_heads)  # fmt: skip
    b, s = a.compute_bytes, a.seq_len
    norm = 4 * h + 4 + (b * h if a.norms_train else 0)
    per_token = 2 * norm
    if first_layer and not a.input_requires_grad:
        per_token -= 4 * h + 4  # nothing upstream needs a gradient, so the first norm saves nothing
    if a.saved_inputs & set(ATTENTION_INPUTS):
        per_token += b * h
    if a.flash_attention:
        per_token += b * (2 * q + 2 * kv) + 4 * heads
    else:
        per_token += 3 * b * q + 4 * heads * s + (b * heads * s if b < 4 else 0)
        per_token += b * q if "o_proj" in a.saved_inputs else 0
    if a.saved_inputs & set(MLP_INPUTS):
        per_token += b * h
    per_token += 3 * b * i + (b * i if "down_proj" in a.saved_inputs else 0)
    per_token += b * a.lora_rank * len(a.lora_targets)
    per_token += _dropout_saved(config, a, a.lora_targets, first_layer and not a.input_requires_grad)
    return per_token * a.tokens


# The projections by input, in the order a layer runs them (q, k and v read the same input).
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _dropout_saved(config: ModelConfig, a: ActivationSetup, targets, input_without_grad: bool = False) -> int:
    """Per token: what the adapters among `targets` save for their dropout (see the module docstring).

    `input_without_grad`: the layer's input needs no gradient (the first layer of LoRA), so an input
    needs one (and its adapter keeps a mask) only once an earlier adapter of the layer feeds it."""
    if not a.lora_dropout:
        return 0
    widths = {"o_proj": config.q_size, "down_proj": config.intermediate_size}
    mask = a.compute_bytes if a.dropout_mask_bytes is None else a.dropout_mask_bytes
    total, needs_grad = 0, not input_without_grad
    for group in INPUT_GROUPS:
        for name in group:
            if name in a.lora_targets and name in targets:
                width = widths.get(name, config.hidden_size)
                total += a.compute_bytes * width + (mask * width if needs_grad else 0)
        needs_grad = needs_grad or any(name in a.lora_targets for name in group)
    return total


def layer_checkpoint_bytes(config: ModelConfig, a: ActivationSetup) -> int:
    """What a checkpointed layer keeps: its input."""
    return a.compute_bytes * config.hidden_size * a.tokens


def _after_attention_saved(config: ModelConfig, a: ActivationSetup) -> int:
    """Per token: what a layer saves after its attention core (o_proj input, second norm, MLP, their LoRA)."""
    b, h, i = a.compute_bytes, config.hidden_size, config.intermediate_size
    out = 4 * h + 4 + (b * h if a.norms_train else 0)
    out += b * h if a.saved_inputs & set(MLP_INPUTS) else 0
    out += 3 * b * i + (b * i if "down_proj" in a.saved_inputs else 0)
    out += b * a.lora_rank * len(a.lora_targets & {"o_proj", "gate_proj", "up_proj", "down_proj"})
    out += _dropout_saved(config, a, ("o_proj", "gate_proj", "up_proj", "down_proj"))
    if not a.flash_attention and "o_proj" in a.saved_inputs:
        out += b * config.q_size
    return out


def layer_backward_workspace(config: ModelConfig, a: ActivationSetup) -> int:
    """Transient bytes of one layer's backward above everything the layer saved.

    The MLP is differentiated first: SwiGLU's product backward holds three [N, i] gradients while the
    product itself (saved only when down trains) is already released. The attention core comes after the
    MLP's, the second norm's and o_proj's saved tensors are gone: flash holds dq, dk, dv; eager holds the
    fp32 gradients of the softmax output and input ([H, S] per token each) once the bf16 softmax copy
    is released.
    """
    b, h, i = a.compute_bytes, config.hidden_size, config.intermediate_size
    incoming = b * h  # the gradient flowing into the layer
    mlp = incoming + 3 * b * i - (b * i if "down_proj" in a.saved_inputs else 0)
    if a.flash_attention:
        attn = b * (config.q_size + 2 * config.kv_size)
    else:
        scores = config.num_attention_heads * a.seq_len
        attn = 8 * scores - (b * scores if b < 4 else 0)
    return max(mlp, incoming + attn - _after_attention_saved(config, a), 0) * a.tokens


def layer_forward_workspace(config: ModelConfig, a: ActivationSetup) -> int:
    """Transient bytes of one layer's forward above everything the layer keeps (0 if below).

    With checkpointing nothing but the input is kept, so the residual stream, the normed input and
    SwiGLU's three [N, i] intermediates are alive at once. Eager attention holds two [H, S] score tensors
    in the compute dtype (scaled, then masked) before the softmax, while the tensors the layer saves after
    its attention do not exist yet.
    """
    b, h, i = a.compute_bytes, config.hidden_size, config.intermediate_size
    per_token = 0
    if a.checkpointing:
        per_token = 2 * b * h + 3 * b * i
    elif not a.flash_attention:
        scores = config.num_attention_heads * a.seq_len
        per_token = max(2 * b * scores - _after_attention_saved(config, a), 0)
    return per_token * a.tokens


def model_saved_bytes(config: ModelConfig, a: ActivationSetup) -> int:
    """Saved outside the decoder layers, logits excluded: final norm, lm_head input, RoPE tables, labels."""
    h, b = config.hidden_size, a.compute_bytes
    per_token = 4 * h + 4 + (b * h if a.norms_train else 0) + (b * h if a.lm_head_trains else 0) + 8
    rope = 2 * b * config.head_dim * a.seq_len
    return per_token * a.tokens + rope


def _loss_tokens(a: ActivationSetup) -> int:
    """Tokens whose logits exist at once: all of them, or one chunk when the loss is chunked."""
    return min(a.tokens, a.loss_chunk_tokens) if a.loss_chunk_tokens else a.tokens


def logits_forward_bytes(config: ModelConfig, a: ActivationSetup) -> int:
    """Peak of the loss forward: logits, their fp32 copy (when b < 4), the saved fp32 log-softmax."""
    b, v = a.compute_bytes, config.vocab_size
    return (b * v + (4 * v if b < 4 else 0) + 4 * v) * _loss_tokens(a)


def logits_backward_bytes(config: ModelConfig, a: ActivationSetup) -> int:
    """Peak of the loss backward: saved log-softmax and its incoming and outgoing fp32 gradients."""
    return 12 * config.vocab_size * _loss_tokens(a)
