"""Which int4 KV remedies help, alone and combined (issue 19): a fake-quantized attention sweep.

    python benchmarks/kv_fidelity_sweep.py [--tokens 2048] [--texts pydoc,gpl3] [--variants a,b,...]

Each variant quantizes and dequantizes K and V exactly as a KV pool of that layout would store them
and runs attention over what was stored, in a dense float32 forward of each 512-token window:

- per token ("tok"): one asymmetric fp16 scale + uint8 zero per group of `g` channels of a head
  (g = head_dim is what the pool stored before issue 19);
- per channel within a block ("chan", KIVI's keys): one scale + zero per channel per block of 16
  tokens, computed when the block is full;
- residual ("res"): the tokens of the query's own, unfinished block are read unquantized (what a pool
  that keeps its newest tokens in bf16 until the block fills gives a decoding sequence);
- rotation ("rot"): K and V turned by the pool's orthogonal matrix before quantizing.
- attention sinks ("sinkN"): the sequence's first N tokens read exact (the int4 pool keeps the blocks of
  its first 32); a longer residual ("winW"): W more blocks before the query's own read exact.

Without the residual every key and value is read quantized, the token's own included, as the engine's
prefill reads "as stored". Reference: the same model with float K/V. Metrics per text: Δppl, mean and
p99 KL(ref || variant) of the next-token distribution, top-1 agreement.

Texts: "tune" = the calibration slice of pydoc_data.topics (the variant choice is made on it);
"pydoc" = the evaluation slice; "gpl3" = /usr/share/common-licenses/GPL-3 (Debian's copy of the GNU
GPL v3, plain English legal prose); 2,048 tokens of each in 512-token windows by default, the windows of
benchmarks/weight_fidelity.py. Results merge into benchmarks/results/kv_fidelity.json (or --out) text by
text and variant by variant (a variant already there is skipped unless --force), with each variant's
bytes per token and KV head.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimlm.eval.fidelity import FidelityStats, summary_line
from slimlm.eval.texts import named_text
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.quant_ops import rotation_matrix
from slimlm.loading import load


@dataclass(frozen=True)
class Scheme:
    k_bits: int = 4
    v_bits: int = 4
    k_group: int = 0  # channels per scale for per-token keys; 0 = the whole head
    v_group: int = 0
    k_channel: bool = False  # KIVI: keys per channel within a block (needs residual)
    residual: bool = False
    rotate: bool = True
    block: int = 16
    sink: int = 0  # the first `sink` tokens of the sequence read exact (attention sinks; needs residual)
    window: int = 0  # blocks before the query's own also read exact (a longer residual; needs residual)
    stage_bf16: bool = False  # exact reads rounded to bf16, as the pool's staging stores them


VARIANTS = {
    "int8": Scheme(8, 8),
    "int8-norot": Scheme(8, 8, rotate=False),
    "int4": Scheme(),
    "int4-norot": Scheme(rotate=False),
    "int4-g32": Scheme(k_group=32, v_group=32),
    "int4-g16": Scheme(k_group=16, v_group=16),
    "int4-res": Scheme(residual=True),
    "int4-kivi-res": Scheme(k_channel=True, residual=True, rotate=False),
    "int4-kivi-res-rot": Scheme(k_channel=True, residual=True),
    "k8v4": Scheme(8, 4),
    "k8v4-g32": Scheme(8, 4, v_group=32),
    "k8v4-norot": Scheme(8, 4, rotate=False),
    "int4-g32-res": Scheme(k_group=32, v_group=32, residual=True),
    "int4-g16-res": Scheme(k_group=16, v_group=16, residual=True),
    "int4-kivi-g32-res": Scheme(k_channel=True, v_group=32, residual=True, rotate=False),
    "k8v4-g32-res": Scheme(8, 4, v_group=32, residual=True),
    "int8-g32": Scheme(8, 8, k_group=32, v_group=32),
    "int8-g16": Scheme(8, 8, k_group=16, v_group=16),
    "int8-kivi-res": Scheme(8, 8, k_channel=True, residual=True),
    "int8-res": Scheme(8, 8, residual=True),
    "int4-kivi-vg32-res-rot": Scheme(k_channel=True, v_group=32, residual=True),
    "int4-kivi-vg16-res-rot": Scheme(k_channel=True, v_group=16, residual=True),
    "k8v4-res": Scheme(8, 4, residual=True),
    "k8v4-g32-res-rot": Scheme(8, 4, v_group=32, residual=True),
    # attention sinks (StreamingLLM, IntactKV, KVQuant) and a longer residual window (KIVI's R)
    "int4-kivi-res-rot-sink16": Scheme(k_channel=True, residual=True, sink=16),
    "int4-kivi-res-rot-sink32": Scheme(k_channel=True, residual=True, sink=32),
    "int4-kivi-res-rot-sink64": Scheme(k_channel=True, residual=True, sink=64),
    "int4-kivi-res-rot-win1": Scheme(k_channel=True, residual=True, window=1),
    "int4-kivi-res-rot-win3": Scheme(k_channel=True, residual=True, window=3),
    "int4-kivi-res-rot-win7": Scheme(k_channel=True, residual=True, window=7),
    "int4-kivi-res-rot-sink16-win1": Scheme(k_channel=True, residual=True, sink=16, window=1),
    "int4-kivi-res-rot-sink32-win1": Scheme(k_channel=True, residual=True, sink=32, window=1),
}


def fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric quantize-dequantize along `dim` exactly as slimlm/kv/quant_ops.quantize does."""
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True).clamp(max=0)
    hi = x.amax(dim=dim, keepdim=True).clamp(min=0)
    s = ((hi - lo) / levels).clamp(2.0**-24, 65504.0).half().float()
    z = torch.round(-lo / s).clamp(0, levels)
    return (torch.round(x / s + z).clamp(0, levels) - z) * s


def per_token(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    t, h, d = x.shape
    g = group or d
    return fake_quant(x.reshape(t, h, d // g, g), bits, -1).reshape(t, h, d)


def per_channel(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    t, h, d = x.shape
    n = -(-t // block) * block
    padded = torch.cat((x, x[-1:].expand(n - t, h, d)))  # a partial last block: never read quantized
    return fake_quant(padded.view(n // block, block, h, d), bits, 1).reshape(n, h, d)[:t]


class SimAttention:
    """Dense causal attention of one window over K/V as a pool of `scheme` would store them."""

    def __init__(self, config, scheme: Scheme | None) -> None:
        self.scheme, self.scale = scheme, config.head_dim**-0.5
        self.rot = rotation_matrix(config.head_dim)

    def attend(self, layer, q, k, v, meta):
        sc = self.scheme
        t, h, d = q.shape
        kvh = k.shape[1]
        q, k, v = q.float(), k.float(), v.float()
        if sc is not None and sc.rotate:
            q, k, v = q @ self.rot, k @ self.rot, v @ self.rot
        if sc is not None and sc.stage_bf16:  # what the pool's bf16 staging gives back
            k, v = k.bfloat16().float(), v.bfloat16().float()
        if sc is None:
            kq, vq = k, v
        else:
            kq = per_channel(k, sc.k_bits, sc.block) if sc.k_channel else per_token(k, sc.k_bits, sc.k_group)
            vq = per_token(v, sc.v_bits, sc.v_group)
        rep = h // kvh
        qh = q.transpose(0, 1)  # [H, T, D]
        kq_, vq_ = (x.repeat_interleave(rep, 1).transpose(0, 1) for x in (kq, vq))
        pos = torch.arange(t)
        causal = pos[None, :] <= pos[:, None]
        scores = qh @ kq_.transpose(1, 2) * self.scale
        if sc is not None and sc.residual:
            k_, v_ = (x.repeat_interleave(rep, 1).transpose(0, 1) for x in (k, v))
            own = exact_reads(sc, pos)
            scores = torch.where(own, qh @ k_.transpose(1, 2) * self.scale, scores)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        if sc is not None and sc.residual:
            out = (probs * ~own) @ vq_ + (probs * own) @ v_
        else:
            out = probs @ vq_
        out = out.transpose(0, 1)
        if sc is not None and sc.rotate:
            out = out @ self.rot.T
        return out


def exact_reads(sc: Scheme, pos: torch.Tensor) -> torch.Tensor:
    """[query, key] True where the key is read exact: the query's own block (and `window` blocks before
    it), and the first `sink` tokens of the sequence."""
    qb, kb = pos[:, None] // sc.block, pos[None, :] // sc.block
    return (kb >= qb - sc.window) | (pos[None, :] < sc.sink)


@torch.inference_mode()
def window_logits(model, ids: torch.Tensor, attention) -> torch.Tensor:
    s = ids.shape[0]
    meta = AttnMetadata(query_lens=[s], context_lens=[s])
    hidden = model(ids, torch.arange(s), attention, meta)
    return model.compute_logits(hidden)


def bytes_per_token(sc: Scheme, head_dim: int) -> float:
    """K + V bytes per token and KV head as a pool of this layout stores them (staging not counted):
    codes, plus an fp16 scale and uint8 zero per group per token, or per channel per block for KIVI keys."""
    total = 0.0
    for bits, group, channel in ((sc.k_bits, sc.k_group, sc.k_channel), (sc.v_bits, sc.v_group, False)):
        total += head_dim * bits / 8
        total += 3 * head_dim / sc.block if channel else 3 * head_dim // (group or head_dim)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--texts", default="pydoc,gpl3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/kv_fidelity.json")
    ap.add_argument("--force", action="store_true", help="run variants already in --out again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Results merge into --out text by text and variant by variant, so a long sweep runs in parts.
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if saved and (saved.get("tokens_per_text"), saved.get("context")) != (args.tokens, args.context):
        raise SystemExit(f"{out_path} holds another window setting; use another --out")
    saved.update(tokens_per_text=args.tokens, context=args.context)
    loaded = load(None, dtype="float32", progress=False)
    model, config = loaded.model, loaded.config
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    saved.setdefault("variants", {}).update(
        {n: {**VARIANTS[n].__dict__, "bytes_per_token_head": bytes_per_token(VARIANTS[n], config.head_dim)}
         for n in names}
    )  # fmt: skip
    results = saved.setdefault("results", {})
    for text in args.texts.split(","):
        done = results.setdefault(text, {})
        todo = [n for n in names if args.force or n not in done]
        if not todo:
            continue
        ids = loaded.tokenizer.encode(named_text(text), add_special_tokens=False)[: args.tokens + 1]
        stats = {n: FidelityStats() for n in todo}
        start = time.perf_counter()
        for w in range(0, len(ids) - args.context, args.context):
            window = torch.tensor(ids[w : w + args.context + 1])
            ref = window_logits(model, window[:-1], SimAttention(config, None))
            for n in todo:
                logits = window_logits(model, window[:-1], SimAttention(config, VARIANTS[n]))
                stats[n].add(ref, logits, window[1:])
            print(f"  {text} window {w // args.context}: {time.perf_counter() - start:.0f} s", flush=True)
        for n in todo:
            r = done[n] = stats[n].summary()
            print(f"{text:6s} {n:24s} {summary_line(r)}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
