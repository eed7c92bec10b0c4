"""Peak RSS of serving: what laying the weights out and a long prefill add, bounded by the sizes involved.

Each measurement runs in a fresh process (the peak of this one is the whole test session's) and reads
VmRSS / VmHWM from /proc, after resetting the peak (`/proc/self/clear_refs` 5) where the phase starts.
The bounds come from the tensor sizes, not from a run of this code: see each test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.kernels import build, qlinear
from slimlm.kernels.qlinear import KernelLinear
from slimlm.kernels.qweights import dequantize, pack

MiB = 2**20
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="reads VmRSS / VmHWM and resets the peak through /proc"
)
needs_kernel = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)

_COMMON = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads(2)
from slimlm.heap import release_free_heap

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def start():
    release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return status("VmRSS")
"""

_LAYOUT = (
    _COMMON
    + """
from slimlm.config import ModelConfig
from slimlm.models import build_model
from slimlm.models.prepack import prepare_linears
config = ModelConfig(family="llama", vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=4)
model = build_model(config, torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        p.normal_()  # resident, as after a load
parts = {n: p.numel() * p.element_size() for n, p in model.named_parameters()
         if n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
per_layer = {}
for n, b in parts.items():
    fused = "gate_up" if ("gate" in n or "up_" in n) else "qkv"
    key = (n.split(".")[2], fused)
    per_layer[key] = per_layer.get(key, 0) + b
before = start()
prepare_linears(model, sys.argv[1])
print("RESULT " + json.dumps(dict(before=before, peak=status("VmHWM"), after=status("VmRSS"),
                                  parts=sum(parts.values()), largest_fusion=max(per_layer.values()))))
"""
)

_PREFILL = (
    _COMMON
    + """
from slimlm.kernels.qweights import pack
from slimlm.kernels.qlinear import KernelLinear
rows, k, n = 3072, 576, 2048  # SmolLM2's fused gate/up; 16 prompts of 128 tokens
g = torch.Generator().manual_seed(0)
d = torch.rand(rows, k // 64, generator=g) * 0.01 + 0.001
lin = KernelLinear(pack(torch.randint(0, 16, (rows, k), dtype=torch.uint8, generator=g), d, -8 * d, 4, 64))
x = torch.randn(n, k, generator=g, dtype=torch.bfloat16)
lin(x[:4])  # the library loaded and its first call made
before = start()
y = lin(x)
print("RESULT " + json.dumps(dict(before=before, peak=status("VmHWM"), out=y.numel() * y.element_size(),
                                  input=x.numel() * x.element_size())))
"""
)


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert out.returncode == 0 and line, out.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


@needs_proc
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_laying_out_the_linears_never_holds_all_the_parts_beside_their_fused_copies(layout):
    """Fusing q/k/v and gate/up copies each group into one tensor. The parts must be freed (and their pages
    returned) as each module is done, so the peak grows by about one fusion, not by all the parts (here
    80 MiB: the old loop held every part to the end, and glibc kept their freed pages resident after it,
    ~130 MiB of a bf16 SmolLM2 run). Bounds: peak growth < two of the largest fusions + 6 MiB (the parts
    and their copy; "packed" three: oneDNN reorders the copy into a third buffer); what remains < 6 MiB
    (the fused tensors replace their parts byte for byte)."""
    if layout == "packed":
        from slimlm.models.prepack import prepack_available

        if not prepack_available():
            pytest.skip("oneDNN packing unavailable in this torch build")
    r = _run(_LAYOUT, layout)
    assert r["parts"] > 60 * MiB  # the measurement means something: all parts are far above the bound
    grown, kept = r["peak"] - r["before"], r["after"] - r["before"]
    copies = 3 if layout == "packed" else 2
    assert grown < copies * r["largest_fusion"] + 6 * MiB, f"peak grew {grown / MiB:.0f} MiB ({layout})"
    # oneDNN keeps ~8 MiB of its own (primitive cache, scratch) after packing: one fusion's allowance.
    allowance = r["largest_fusion"] if layout == "packed" else 0
    assert kept < allowance + 6 * MiB, f"{kept / MiB:.0f} MiB still resident after laying out ({layout})"


@needs_proc
@needs_kernel
def test_a_long_prefill_through_a_quantized_linear_holds_one_chunk_of_float32_scratch():
    """2,048 rows through a w4 KernelLinear (SmolLM2's gate/up). The bf16 result (12 MiB) must exist; the
    float32 copy of the input, the int8 codes and the float32 result are scratch for ROW_CHUNK rows at a
    time (256 x (576 x 5 + 3072 x 4) bytes: 3.5 MiB). Bound: result + 8 MiB. Whole-prompt scratch (as
    before) is 30 MiB more than the result."""
    r = _run(_PREFILL)
    grown = r["peak"] - r["before"]
    assert r["out"] == 2048 * 3072 * 2
    assert grown < r["out"] + 8 * MiB, (
        f"peak grew {grown / MiB:.1f} MiB for a {r['out'] / MiB:.0f} MiB result"
    )


@needs_kernel
@pytest.mark.parametrize("bits, group", [(4, 64), (4, 32), (8, -1)])
def test_chunked_rows_give_the_same_bits_as_one_call_and_match_the_dequantized_weights(
    monkeypatch, bits, group
):
    """Rows split into chunks (a remainder included) give exactly the result of one call, which matches
    x W^T on the dequantized weights within int8-activation rounding."""
    rows, k = 96, 256
    g = torch.Generator().manual_seed(bits)
    group = k if group == -1 else group
    d = torch.rand(rows, k // group, generator=g) * 0.02 + 0.001
    codes = torch.randint(0, 2**bits, (rows, k), dtype=torch.uint8, generator=g)
    lin = KernelLinear(
        pack(codes, d, -(2 ** (bits - 1)) * d, bits, group), bias=torch.randn(rows, generator=g)
    )
    x = torch.randn(2, 37, k, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(qlinear, "ROW_CHUNK", 4096)
    whole = lin(x)
    monkeypatch.setattr(qlinear, "ROW_CHUNK", 16)  # 74 rows: 4 chunks of 16 and one of 10
    chunked = lin(x)
    assert chunked.shape == (2, 37, rows) and chunked.dtype == torch.bfloat16
    assert torch.equal(chunked, whole)
    reference = x.float() @ dequantize(lin.kernel_weight()).T + lin.bias.float()
    assert (chunked.float() - reference).abs().max() < 0.02 * reference.abs().max()
