"""The engine's decode step as one C call for the whole model (kernels/decode_cpu.c).

`FusedDecoder.create` checks the model and the KV pool fit the kernel (CPU, bf16 plain rows or int4/int8
weights in the kernel's layout (kernels/qlinear.py), the bf16, int8 or int4 paged pool, a family
kernels/family.py describes, with fused q/k/v and gate/up) and otherwise says why not, so the engine
keeps its PyTorch path.
The kernel reads the model's and the pool's own tensors (no copies): the decoder keeps references to
them. slimlm/engine/backend.py lays the weights out and builds it.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from slimlm.kernels.family import family_params, unsupported
from slimlm.kernels.library import DIMS, Layer, Model, Weight, bf16_weight, library
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.models.llama import LlamaForCausalLM
from slimlm.models.prepack import PackedLinear

MAX_HEAD_DIM = 512  # decode_cpu.c's MAX_HEAD_DIM


def _plain_weight(linear: nn.Module) -> torch.Tensor | None:
    """The row-major weight a linear multiplies by: nn.Linear's, or the plain copy of a "both" layout."""
    if type(linear) is nn.Linear:
        return linear.weight
    if isinstance(linear, PackedLinear):
        return linear.plain_weight
    return None


def _kernel_weight(linear: nn.Module) -> KernelLinear | torch.Tensor | None:
    """What the kernel reads for this linear: its KernelLinear, its bf16 rows, or None (cannot)."""
    return linear if isinstance(linear, KernelLinear) else _plain_weight(linear)


def _kv_bits(cache) -> int | None:
    """16 for the bf16 paged pool, 8 / 4 for the int8 / int4 pools, None for anything else."""
    from slimlm.kv.paged import PagedKVCache
    from slimlm.kv.quantized import QUANTIZED_CACHES

    if type(cache) is PagedKVCache:
        return 16 if cache.k.dtype == torch.bfloat16 else None
    return cache.v_bits if type(cache) in QUANTIZED_CACHES.values() else None


def blocker(model: nn.Module, cache) -> str | None:
    """Why the kernel cannot run this model over this cache, for reasons laying the weights out cannot
    change (family, dtype, pool, device, head size); None when a layout may make it run."""
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family model"
    reason = unsupported(model.config)
    if reason is not None:
        return reason
    dtype = model.model.norm.weight.dtype
    if dtype != torch.bfloat16:
        return f"the C decode kernel needs bf16 weights (this model is {str(dtype).removeprefix('torch.')})"
    if _kv_bits(cache) is None:
        return "the C decode kernel reads the bf16, k8v4, int8 and int4 paged KV pools only"
    if cache.storage_tensors()[0].device.type != "cpu":
        return "the C decode kernel is for CPU"
    if cache.head_dim > MAX_HEAD_DIM:
        return f"the C decode kernel takes head_dim up to {MAX_HEAD_DIM}"
    return None


def _embed_table(model: LlamaForCausalLM):
    embed = model.model.embed_tokens
    if isinstance(embed, KernelEmbedding):
        return embed.table
    return embed.weight if type(embed) is nn.Embedding else None


def _why_not(model: nn.Module, cache) -> str | None:
    """None when the kernel can run this model over this cache; else the reason, for the memory report."""
    reason = blocker(model, cache)
    if reason is not None:
        return reason
    if _embed_table(model) is None or _kernel_weight(model.lm_head) is None:
        return "the embedding or lm_head is quantized in a layout the C decode kernel cannot read"
    tensors = []  # the norms are copied to float32 (kernels/family.py)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            return "q/k/v and gate/up are not fused (lay the weights out with prepare_linears)"
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        weights = [_kernel_weight(lin) for lin in linears]
        if any(w is None for w in weights):
            return "some linears have no plain bf16 rows (quantized, LoRA or packed-only weights)"
        if any(lin.bias is not None for lin in linears[1:]):
            return "only q/k/v may have a bias"
        tensors += [w for w in weights if isinstance(w, torch.Tensor)]
        if attn.qkv_proj.bias is not None:
            tensors.append(attn.qkv_proj.bias)
    tensors += [
        t for t in (_embed_table(model), _kernel_weight(model.lm_head)) if isinstance(t, torch.Tensor)
    ]
    if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in tensors):
        return "the C decode kernel needs contiguous bf16 weights throughout"
    return None


def _uses(model: LlamaForCausalLM) -> tuple[bool, bool]:
    """(any bf16 weight rows, any int4/int8 weights): which vector paths the model needs."""
    weights = [_embed_table(model), _kernel_weight(model.lm_head)]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights += [
            _kernel_weight(lin) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        ]
    quant = [isinstance(w, KernelLinear) for w in weights]
    return not all(quant), any(quant)


class FusedDecoder:
    """decode(tokens, positions, block_tables) -> float32 logits [batch, vocab] for one new token per
    sequence, writing each token's K/V into the pool where the PyTorch path would."""

    def __init__(
        self, lib: ctypes.CDLL, model: LlamaForCausalLM, cache, max_ctx: int, max_batch: int = 1
    ) -> None:
        cfg = model.config
        self._lib = lib
        self._keep: list[object] = []  # every tensor and module the C structs point into stays alive

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            self._keep.append(t)
            return t.data_ptr()

        def weight(w: KernelLinear | torch.Tensor) -> Weight:
            self._keep.append(w)
            return w.weight_struct() if isinstance(w, KernelLinear) else bf16_weight(w)

        kv_bits = _kv_bits(cache)
        quantized = kv_bits != 16
        extras = (cache.k_scale, cache.v_scale, cache.k_zero, cache.v_zero) if quantized else (None,) * 4
        k_pool, v_pool = (cache.k_codes, cache.v_codes) if quantized else (cache.k, cache.v)
        key_channels = hasattr(cache, "stage_of")  # the int4 pool: KIVI keys, staged unfinished blocks
        staging = (cache.stage_k, cache.stage_v) if key_channels else ()
        self._cache = cache
        fam = family_params(model)
        self._rotaries = fam.rotaries
        layers = (Layer * cfg.num_hidden_layers)()
        for i, layer in enumerate(model.model.layers):
            attn, mlp, p = layer.self_attn, layer.mlp, fam.layers[i]
            layers[i] = Layer(
                weight(_kernel_weight(attn.qkv_proj)),
                ptr(attn.qkv_proj.bias),
                weight(_kernel_weight(attn.o_proj)),
                weight(_kernel_weight(mlp.gate_up_proj)),
                weight(_kernel_weight(mlp.down_proj)),
                ptr(p.in_norm),
                ptr(p.post_norm),
                ptr(k_pool[i]),
                ptr(v_pool[i]),
                *(None if t is None else ptr(t[i]) for t in extras),
                *(ptr(t[i]) for t in staging) if staging else (None, None),
                *(ptr(t) for t in (p.q_norm, p.k_norm, p.attn_out_norm, p.mlp_out_norm)),
                p.window,
                p.rope,
            )
        self._layers = layers
        m = Model()
        for name, value in zip(
            DIMS,
            (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
             cfg.head_dim, cfg.num_hidden_layers, cfg.vocab_size),
            strict=True,
        ):  # fmt: skip
            setattr(m, name, value)
        m.block_size, m.num_blocks = cache.block_size, cache.num_blocks
        m.max_ctx, m.threads = max_ctx, torch.get_num_threads()
        m.act, m.ropes, m.embed_scale, m.final_softcap = (
            fam.act,
            len(fam.rotaries),
            fam.embed_scale,
            fam.final_softcap,
        )
        m.eps, m.scale, m.kv_bits = cfg.rms_norm_eps, cache.scale, kv_bits
        if quantized:
            m.k_bits, m.v_bits = cache.k_bits, cache.v_bits
            m.k_group, m.v_group = cache.k_group, cache.v_group
        if key_channels:
            m.key_channels, m.stage_of, m.sink_blocks = 1, ptr(cache.stage_of), cache.sink_blocks
        m.rotation = ptr(cache.rotation.float().contiguous()) if quantized else None
        m.embed = weight(_embed_table(model))
        embed = model.model.embed_tokens
        m.embed_div = ptr(embed.lookup_scale) if isinstance(embed, KernelEmbedding) else None
        m.final_norm = ptr(fam.final_norm)
        m.lm_head = weight(_kernel_weight(model.lm_head))
        m.layer = layers
        self.max_batch = max_batch
        self._work = torch.empty(lib.slim_work_floats(ctypes.byref(m), max_batch), dtype=torch.float32)
        m.work = self._work.data_ptr()
        self._model = m
        self.vocab = cfg.vocab_size

    @classmethod
    def create(
        cls, model: nn.Module, cache, max_ctx: int, max_batch: int = 1, require_fast: bool = False
    ) -> tuple[FusedDecoder | None, str]:
        """(decoder, "C kernel") where it can run, else (None, why not); `require_fast` as in `library`."""
        reason = _why_not(model, cache)
        if reason is not None:
            return None, reason
        lib, what = library(*_uses(model), require_fast)
        if lib is None:
            return None, what
        return cls(lib, model, cache, max_ctx, max_batch), what

    @property
    def scratch_bytes(self) -> int:
        return self._work.numel() * self._work.element_size()

    def decode(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One new token for each sequence -> float32 logits [len(tokens), vocab]."""
        batch = len(tokens)
        if not 0 < batch <= self.max_batch:
            raise ValueError(f"decode kernel holds scratch for {self.max_batch} sequences, got {batch}")
        pos = torch.tensor(positions)
        pairs = [rotary(pos, torch.float32) for rotary in self._rotaries]  # [ropes, batch, head_dim] each
        cos = torch.stack([c for c, _ in pairs]).contiguous()
        ssin = torch.stack([s for _, s in pairs]).contiguous()
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables])
        ids = torch.tensor(tokens)
        logits = torch.empty(batch, self.vocab, dtype=torch.float32)
        self._model.threads = torch.get_num_threads()
        staged = hasattr(self._cache, "prepare_decode")
        if staged:  # every token's block has its staging slot before the kernel writes there
            self._cache.prepare_decode(positions, block_tables)
        status = self._lib.slim_decode(
            ctypes.byref(self._model), batch, ids.data_ptr(), pos.data_ptr(), cos.data_ptr(), ssin.data_ptr(),
            tables.data_ptr(), width, logits.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"decode kernel refused positions {positions} (tables of {width} blocks)")
        if staged:
            self._cache.finish_decode(positions, block_tables)
        return logits
