"""GGUF files run on their own blocks (`--weights native`): Q4_0, Q4_1, Q4_K, Q5_0, Q6_K and Q8_0
tensors go straight into the C kernel's layouts (slimlm/kernels/qweights*.py), without dequantizing.

Each block keeps its exact values: Q4_1 is d * q + m as stored; Q4_0 is d * (q - 8), i.e. m = -8 d;
Q8_0 is d * q with signed q, stored as code q + 128 and m = -128 d (all exact in fp16). Q4_K's 8
sub-blocks of 32 per 256 each have a 6-bit scale and minimum: d * sc and -dmin * m make them int4 g32
groups exactly. Q5_0 (d * (q - 16), q < 32) and Q6_K (d * sc * (q - 32), an int8 sc per 16) keep their
own forms at the file's bytes (kernels/qweights_q5.py, qweights_q6.py); a Q5_0 part fused with a Q8_0
one (q/k beside v) is widened to int8 g32 instead, also exact. llama.cpp's Q/K row order (interleaved
RoPE pairs) is undone on the codes and scales. Tensors of other types (F32/F16 norms, other k-quants)
are dequantized into the model as usual, and each quantized one that could not run natively gets a
note for the memory report. q/k/v (and gate/up) run natively only when all parts have one kernel form;
else all are dequantized (the kernel fuses them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimlm.errors import SlimlmError

Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 2, 3, 6, 8, 12, 14
NATIVE = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}
NATIVE_BITS = {Q4_0: 4, Q4_1: 4, Q5_0: 5, Q8_0: 8, Q4_K: 4, Q6_K: 6}  # the kernel format each type goes to
TABLE_BLOCK_ROWS = 4096  # rows unpacked at once for tensors this tall (vocab tables): a multiple of 16
# Fused with a part of another width (Gemma's q/k Q5_0 beside a Q8_0 v), Q5_0 goes to int8 g32 (exact).
WIDENED_BITS = {Q5_0: 8}
FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16
WEIGHTS_CHOICES = ("float", "native")


def check_weights_choice(weights: str) -> None:
    if weights not in WEIGHTS_CHOICES:
        raise SlimlmError(f"unknown --weights {weights!r}; choose one of {', '.join(WEIGHTS_CHOICES)}")


def block_codes(raw: np.ndarray, qtype: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """GGUF blocks [rows, bytes] -> (codes uint8 [rows, k], d, m float32 [rows, k / 32], bits)."""
    rows = raw.shape[0]
    if qtype in (Q4_K, Q5_0):
        from slimlm.loading.gguf_kquants import q4_k_groups, q5_0_groups

        codes, d, m = (q4_k_groups if qtype == Q4_K else q5_0_groups)(raw)
        return (torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(d)),
                torch.from_numpy(np.ascontiguousarray(m)), WIDENED_BITS.get(qtype, NATIVE_BITS[qtype]))  # fmt: skip
    size = {Q4_0: 18, Q4_1: 20, Q8_0: 34}[qtype]
    blocks = raw.reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == Q8_0:
        # code = q + 128 for the signed byte q: in two's complement that is the raw byte with its top bit
        # flipped, so one uint8 array (the table's size) instead of int16 temporaries 4x that
        codes, m, bits = blocks[..., 2:] ^ np.uint8(0x80), -128.0 * d, 8
    else:
        start = 2 if qtype == Q4_0 else 4
        qs = blocks[..., start:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j < 16 low nibble, j + 16 high
        m = -8.0 * d if qtype == Q4_0 else blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        bits = 4
    return (torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1))), torch.from_numpy(d),
            torch.from_numpy(np.ascontiguousarray(m)), bits)  # fmt: skip


def _hf_rows(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """llama.cpp's Q/K row order -> HF's (see gguf_file._file_order_view)."""
    if not heads:
        return t
    rows = t.shape[0]
    return t.view(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)


def load_gguf_native(path: Path, dtype: torch.dtype, device, progress: bool):
    """Like slimlm.loading._load_gguf, with Q4_0/Q4_1/Q8_0 linears (and embedding) on the C kernel."""
    from slimlm.kernels.library import library
    from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
    from slimlm.kernels.qweights import concat, pack, stack_rows
    from slimlm.loading import LoadedModel, _one_torch_thread
    from slimlm.loading.gguf_file import GGUFFile, config_and_tokenizer, gguf_weights
    from slimlm.loading.weights import fill_weights
    from slimlm.models import materialize_empty, meta_model
    from slimlm.models.prepack import FUSIONS
    from slimlm.models.rope import RotaryEmbedding

    if torch.device(device).type != "cpu":
        raise SlimlmError("--weights native runs on the CPU (the C kernel); use --weights float on a GPU")
    lib, why = library(False, False, False)
    if lib is None:
        raise SlimlmError(f"--weights native needs slimlm's C kernel, which is unavailable here: {why}; "
                          "use --weights float")  # fmt: skip
    notes: list[str] = []
    with GGUFFile(path) as file:
        config, tokenizer = config_and_tokenizer(file)
        config.torch_dtype = str(dtype).removeprefix("torch.")
        file.drop_metadata()
        model = meta_model(config)  # no storage, no init: the kernel's modules go straight in
        sources = dict(gguf_weights(file, config))

        def native(name: str):
            src = sources.get(name)
            return src if src is not None and src.info.qtype in NATIVE else None

        def kernel_weight(name: str, widen: bool = False):
            src = sources[name]
            if src.info.qtype == Q6_K:
                return _q6k_weight(file, src)
            if src.info.qtype == Q5_0 and not widen:
                return _q5_0_weight(file, src)
            raw, heads = file.raw(src.info), src.unpermute_heads
            if heads or raw.shape[0] <= TABLE_BLOCK_ROWS:
                codes, d, m, bits = block_codes(raw, src.info.qtype)
                w = pack(_hf_rows(codes, heads), _hf_rows(d, heads), _hf_rows(m, heads), bits, 32)
            else:  # a vocab-sized table: unpacked a block of rows at a time (tiles are independent)
                blocks = (block_codes(raw[r : r + TABLE_BLOCK_ROWS], src.info.qtype)
                          for r in range(0, raw.shape[0], TABLE_BLOCK_ROWS))  # fmt: skip
                w = stack_rows([pack(codes, d, m, bits, 32) for codes, d, m, bits in blocks])
            file.release(src.info)
            return w

        taken: set[str] = set()
        dequantized: dict[str, int] = {}
        with _one_torch_thread():
            for i, layer in enumerate(model.model.layers):
                prefix = f"model.layers.{i}."
                for module, mod_name in ((layer.self_attn, "self_attn"), (layer.mlp, "mlp")):
                    groups = [(f, parts) for f, parts in FUSIONS if all(hasattr(module, p) for p in parts)]
                    groups += [(None, (p,)) for p in ("o_proj", "down_proj") if hasattr(module, p)]
                    for fused, parts in groups:
                        names = [f"{prefix}{mod_name}.{p}.weight" for p in parts]
                        kinds = {sources[n].info.qtype if native(n) else None for n in names}
                        bias_names = [n.removesuffix("weight") + "bias" for n in names]
                        widen = None not in kinds and len({NATIVE_BITS[k] for k in kinds}) > 1
                        widen = widen and len({WIDENED_BITS.get(k, NATIVE_BITS[k]) for k in kinds}) == 1
                        if None in kinds or (len({NATIVE_BITS[k] for k in kinds}) > 1 and not widen):
                            for n in names:
                                qtype = sources[n].info.qtype
                                if qtype not in FLOAT_TYPES:
                                    dequantized[_type_name(qtype)] = dequantized.get(_type_name(qtype), 0) + 1
                            continue
                        weights = [kernel_weight(n, widen) for n in names]
                        biases = [sources.get(b) for b in bias_names]
                        bias = None
                        if any(b is not None for b in biases):
                            bias = torch.cat([_dense(b, dtype) for b in biases])
                        new = KernelLinear(weights[0] if len(weights) == 1 else concat(weights), bias)
                        if fused is None:
                            setattr(module, parts[0], new)
                        else:
                            for p in parts:
                                delattr(module, p)
                            setattr(module, fused, new)
                        taken.update(names)
                        taken.update(b for b, src in zip(bias_names, biases, strict=True) if src is not None)
            embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
            tied = config.tie_word_embeddings
            if native(embed_name):
                table = KernelLinear(kernel_weight(embed_name))
                model.model.embed_tokens = KernelEmbedding(table, dtype, tied)
                if tied:
                    model.lm_head = table
                taken.add(embed_name)
            elif sources[embed_name].info.qtype not in FLOAT_TYPES:
                name = _type_name(sources[embed_name].info.qtype)
                dequantized[name] = dequantized.get(name, 0) + 1
            if not tied and native(head_name):
                model.lm_head = KernelLinear(kernel_weight(head_name))
                taken.add(head_name)
            elif not tied and head_name in sources and sources[head_name].info.qtype not in FLOAT_TYPES:
                name = _type_name(sources[head_name].info.qtype)
                dequantized[name] = dequantized.get(name, 0) + 1
            materialize_empty(model, dtype, "cpu")  # only what is still on meta
            for param in model.parameters():
                param.data = param.data.to(dtype)
            model.model.rotary_emb = RotaryEmbedding(config, device="cpu")
            if hasattr(model.model, "rotary_local"):  # Gemma 3's sliding layers
                model.model.rotary_local = RotaryEmbedding(config, device="cpu", local=True)
            if tied and not isinstance(model.model.embed_tokens, KernelEmbedding):
                model.lm_head.weight = model.model.embed_tokens.weight
            rest = [(n, s) for n, s in sources.items() if n not in taken]
            fill_weights(model, rest, len(rest), f"loading {path.name}", progress)
    if dequantized:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(dequantized.items()))
        notes.append(
            f"GGUF tensors without a native kernel path dequantized to {config.torch_dtype}: {kinds}"
        )
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    loaded = LoadedModel(model.eval(), config, tokenizer, gen, path)
    loaded.notes = notes
    return loaded


def _q5_0_weight(file, src):
    from slimlm.kernels.qweights_q5 import pack_q5_0
    from slimlm.loading.gguf_kquants import q5_0_groups

    heads = src.unpermute_heads
    codes, d, _ = (torch.from_numpy(np.ascontiguousarray(a)) for a in q5_0_groups(file.raw(src.info)))
    w = pack_q5_0(_hf_rows(codes, heads), _hf_rows(d, heads))
    file.release(src.info)
    return w


def _q6k_weight(file, src):
    from slimlm.kernels.qweights_q6 import pack_q6k
    from slimlm.loading.gguf_kquants import q6_k_groups

    heads = src.unpermute_heads
    parts = [torch.from_numpy(np.ascontiguousarray(a)) for a in q6_k_groups(file.raw(src.info))]
    w = pack_q6k(*(_hf_rows(p, heads) for p in parts))
    file.release(src.info)
    return w


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def _dense(src, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=dtype)
    src.copy_to(out)
    return out
