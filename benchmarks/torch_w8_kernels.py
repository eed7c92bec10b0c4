"""Ways to multiply by grouped int8 weights in PyTorch: ms per decode step over SmolLM2's linears.

    /work/wt/bin/quiet python benchmarks/torch_w8_kernels.py [--rows 1,16] [--runs 7] [--threads 2]

One "step" is 30 layers of SmolLM2-135M's linears (q, k, v, o at 576 x 576 / 192 x 576, gate and up
1536 x 576, down 576 x 1536; int8 groups of 64) plus the tied head (49152 x 576, int8 groups of 32), at
`rows` activation rows, as the engine's PyTorch path runs them (oneDNN off for one row). Each option
computes the same product (checked against a float32 reference first); the median of `--runs` is
reported. Writes benchmarks/results/torch_w8_kernels.json. Options:

- bf16: plain bf16 weights and F.linear (the bf16 model's path, for comparison; 2 bytes per weight).
- dequant_old: main's DequantLinear (uint8 codes, zero points, scales cast per call, then F.linear).
- int8pack_channel: torch's `_weight_int8pack_mm` on per-channel int8 (what per-channel w8 runs;
  a different quantization, shown for its speed only: the kernel takes no group scales).
- mul_linear: int8 codes times bf16 group scales in one broadcast multiply, then F.linear.
- mul_linear_chunked: the same, `chunk` output rows at a time into one reused scratch buffer.
- bmm_groups: codes [G, N, gs] converted to bf16, one bmm per step over the groups, then the group
  scales applied to the [G, M, N] partial products and summed (out = sum_g (x_g @ W_g^T) * d_g).
- bf16_packed: bf16 weights prepacked for oneDNN (the engine's `packed` layout for batches).
- int8pair / int8pair_kernel / int8pair_dequant: slimlm.quant.int8pair.Int8PairLinear as shipped
  (the kernel up to DEQUANT_ROWS rows, then dequantize), and each path forced.
- int4_pair: int8 codes split into two nibbles, run as one int4 tinygemm over [x, x] (K doubled),
  the high nibble with scale 16·d (same bytes as int8).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)
LAYERS = 30


def make_weight(n: int, k: int, gs: int, gen: torch.Generator) -> dict:
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, k // gs, generator=gen) * 1e-3 + 1e-4).to(torch.float16).float()
    return {"codes": codes, "scales": scales, "gs": gs}


def reference(x: torch.Tensor, w: dict) -> torch.Tensor:
    n, k = w["codes"].shape
    deq = (w["codes"].float().view(n, -1, w["gs"]) * w["scales"].unsqueeze(-1)).view(n, k)
    return x.float() @ deq.T


class Option:
    """Prepare per-weight state once, then `run(x, state)` per step."""

    def prepare(self, w: dict) -> object:
        raise NotImplementedError

    def run(self, x: torch.Tensor, s) -> torch.Tensor:
        raise NotImplementedError


class Bf16(Option):
    def prepare(self, w):
        n, k = w["codes"].shape
        deq = (w["codes"].float().view(n, -1, w["gs"]) * w["scales"].unsqueeze(-1)).view(n, k)
        return deq.to(torch.bfloat16)

    def run(self, x, s):
        return F.linear(x, s)


class DequantOld(Option):
    def prepare(self, w):
        codes = (w["codes"].to(torch.int16) + 128).to(torch.uint8)
        zeros = torch.full(w["scales"].shape, 128, dtype=torch.uint8)
        return codes, w["scales"], zeros, w["gs"]

    def run(self, x, s):
        codes, scales, zeros, gs = s
        n, k = codes.shape
        sc = scales.to(x.dtype)
        grouped = codes.view(n, k // gs, gs).to(sc.dtype)
        w = ((grouped - zeros.to(sc.dtype).unsqueeze(-1)) * sc.unsqueeze(-1)).view(n, k)
        return F.linear(x, w)


class Int8PackChannel(Option):
    def prepare(self, w):
        return w["codes"], w["scales"].amax(dim=1).to(torch.bfloat16)

    def run(self, x, s):
        return torch.ops.aten._weight_int8pack_mm(x, s[0], s[1])


class MulLinear(Option):
    def prepare(self, w):
        n, k = w["codes"].shape
        return w["codes"].view(n, k // w["gs"], w["gs"]), w["scales"].to(torch.bfloat16).unsqueeze(-1)

    def run(self, x, s):
        codes, scales = s
        return F.linear(x, torch.mul(codes, scales).view(codes.shape[0], -1))


class MulLinearChunked(Option):
    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.scratch = torch.empty(0, dtype=torch.bfloat16)

    def prepare(self, w):
        return MulLinear.prepare(self, w)

    def run(self, x, s):
        codes, scales = s
        n, g, gs = codes.shape
        rows = min(n, self.chunk)
        if self.scratch.numel() < rows * g * gs:
            self.scratch = torch.empty(rows * g * gs, dtype=torch.bfloat16)
        if n <= self.chunk:
            w = torch.mul(codes, scales, out=self.scratch[: n * g * gs].view(n, g, gs))
            return F.linear(x, w.view(n, -1))
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        for i in range(0, n, self.chunk):
            j = min(i + self.chunk, n)
            w = torch.mul(codes[i:j], scales[i:j], out=self.scratch[: (j - i) * g * gs].view(j - i, g, gs))
            torch.mm(x, w.view(j - i, -1).T, out=out[:, i:j])
        return out


class BmmGroups(Option):
    def prepare(self, w):
        n, k = w["codes"].shape
        g = k // w["gs"]
        codes = w["codes"].view(n, g, w["gs"]).transpose(0, 1).contiguous()  # [G, N, gs]
        return codes, w["scales"].T.contiguous().to(torch.bfloat16).unsqueeze(1)  # [G, 1, N]

    def run(self, x, s):
        codes, scales = s
        g, n, gs = codes.shape
        xg = x.view(x.shape[0], g, gs).transpose(0, 1)  # [G, M, gs]
        partial = torch.bmm(xg, codes.to(x.dtype).transpose(1, 2))  # [G, M, N]
        return (partial * scales).sum(0)


class Int4Pair(Option):
    def prepare(self, w):
        from slimlm.quant.linear import _pack_int4

        n, k = w["codes"].shape
        u = (w["codes"].to(torch.int16) + 128).to(torch.int32)  # 0..255
        hi, lo = u >> 4, u & 15
        codes = torch.cat([hi, lo], dim=1)  # [N, 2K]
        d = w["scales"]  # [N, G]
        # tinygemm: w = (q - 8)·s + zf. hi: s = 16d, zf = 0 -> 16d·h - 128d; lo: s = d, zf = 8d -> d·l.
        sz_hi = torch.stack([16 * d, torch.zeros_like(d)], -1)
        sz_lo = torch.stack([d, 8 * d], -1)
        sz = torch.cat([sz_hi, sz_lo], dim=1).to(torch.bfloat16).transpose(0, 1).contiguous()
        return _pack_int4(codes, torch.device("cpu")), sz, w["gs"]

    def run(self, x, s):
        packed, sz, gs = s
        return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([x, x], dim=1), packed, gs, sz)


class Bf16Packed(Option):
    def prepare(self, w):
        from slimlm.models.prepack import PackedLinear

        return PackedLinear(Bf16.prepare(self, w))

    def run(self, x, s):
        return s(x)


class Int8Pair(Option):
    """slimlm.quant.int8pair.Int8PairLinear; `path` forces the int4-kernel or the dequantize path."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def prepare(self, w):
        from slimlm.quant.int8pair import Int8PairLinear
        from slimlm.quant.scheme import QuantizedWeight

        codes = (w["codes"].to(torch.int16) + 128).to(torch.uint8)
        zeros = torch.full(w["scales"].shape, 128, dtype=torch.int32)
        return Int8PairLinear(QuantizedWeight(codes, w["scales"], zeros, 8, w["gs"]), None)

    def run(self, x, s):
        import slimlm.quant.int8pair as pair

        saved = pair.DEQUANT_ROWS
        pair.DEQUANT_ROWS = {None: saved, "kernel": 1 << 30, "dequant": 0}[self.path]
        try:
            return s(x)
        finally:
            pair.DEQUANT_ROWS = saved


def options() -> dict[str, Option]:
    return {
        "bf16": Bf16(),
        "bf16_packed": Bf16Packed(),
        "int8pair": Int8Pair(),
        "int8pair_kernel": Int8Pair("kernel"),
        "int8pair_dequant": Int8Pair("dequant"),
        "dequant_old": DequantOld(),
        "int8pack_channel": Int8PackChannel(),
        "mul_linear": MulLinear(),
        "mul_linear_chunked": MulLinearChunked(4096),
        "bmm_groups": BmmGroups(),
        "int4_pair": Int4Pair(),
    }


def run_step(opt, states, inputs, x, head_state, layers: int, onednn: bool) -> float:
    """Seconds for one step (oneDNN off for one row, as the engine's runner does)."""
    torch._C._set_mkldnn_enabled(onednn)
    start = time.perf_counter()
    for _ in range(layers):
        for s, xi in zip(states, inputs, strict=True):
            opt.run(xi, s)
    opt.run(x, head_state)
    elapsed = time.perf_counter() - start
    torch._C._set_mkldnn_enabled(True)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--options", default=",".join(options()))
    ap.add_argument("--out", default="benchmarks/results/torch_w8_kernels.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layer = [make_weight(n, k, 64, gen) for n, k in LAYER]
    head = make_weight(*HEAD, 32, gen)
    results = {}
    for name in args.options.split(","):
        opt = options()[name]
        states = [opt.prepare(w) for w in layer]
        head_state = opt.prepare(head)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
            xd = torch.randn(rows, 1536, generator=gen).to(torch.bfloat16)
            inputs = [x] * 6 + [xd]
            errs = []
            for w, s, xi in zip([*layer, head], [*states, head_state], [*inputs, x], strict=True):
                ref = reference(xi, w)
                got = opt.run(xi, s).float()
                errs.append(float((got - ref).norm() / ref.norm()))
            step = functools.partial(run_step, opt, states, inputs, x, head_state, args.layers, rows > 1)
            step()
            times = [step() * 1e3 for _ in range(args.runs)]
            row = {"ms_per_step": statistics.median(times), "runs_ms": times, "max_rel_err": max(errs)}
            results[f"{name}@{rows}"] = row
            print(
                f"{name:20s} rows={rows:3d} {row['ms_per_step']:8.2f} ms  rel err {max(errs):.2e}", flush=True
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "layers": args.layers, "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
