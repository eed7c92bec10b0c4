"""One vocabulary of formats (slimlm.formats): each name is checked by one function, whichever door a value
comes in by (the CLI, EngineConfig, the KV pools, the planner), and the planner's bytes are the engine's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimlm.errors import SlimlmError


def _raised_in(excinfo) -> str:
    return excinfo.traceback[-1].frame.code.name


def test_a_bad_kv_dtype_is_refused_by_one_function_everywhere():
    from slimlm.engine.config import EngineConfig
    from slimlm.formats.dtypes import kv_dtype_name
    from slimlm.kv import kv_cache_class
    from slimlm.plan.inference import normalize_kv_dtype

    with pytest.raises(SlimlmError) as ref:
        kv_dtype_name("int3")
    with pytest.raises(SlimlmError) as stored:  # the planner asks for a stored dtype ("auto" resolved)
        kv_dtype_name("int3", allow_auto=False)
    for door, expected in ((lambda: EngineConfig(kv_dtype="int3"), ref), (lambda: kv_cache_class("int3"), ref),
                           (lambda: normalize_kv_dtype("int3"), stored)):  # fmt: skip
        with pytest.raises(SlimlmError) as got:
            door()
        assert str(got.value) == str(expected.value) and _raised_in(got) == "kv_dtype_name"
    # aliases mean the same storage at every door
    assert EngineConfig(kv_dtype="bfloat16").kv_dtype == "bf16" == normalize_kv_dtype("torch.bfloat16")


def test_a_bad_kv_dtype_on_the_command_line_is_one_line():
    out = subprocess.run([sys.executable, "-m", "slimlm.cli", "generate", "--kv-dtype", "int3", "hi"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert (
        out.stderr
        == "error: unknown KV dtype 'int3'; choose one of auto, fp32, bf16, fp16, int8, int4, k8v4\n"
    )


def test_sizes_parse_once():
    from slimlm.formats.sizes import SizeError, format_bytes, parse_size
    from slimlm.plan.units import parse_bytes

    assert parse_size("512MiB") == 512 * 2**20 == parse_bytes("512 MiB")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1000") == 1000 and parse_size("1e9B") == 10**9
    with pytest.raises(SizeError, match="a unit is required"):
        parse_bytes("24")
    assert format_bytes(3 * 2**29) == "1.50 GiB" and format_bytes(None) == "n/a"


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit", "factor4bit"])
def test_the_optimizers_allocate_the_layouts_the_planner_counts(name):
    torch = pytest.importorskip("torch")
    from slimlm.formats.optimizers import moment_layouts
    from slimlm.train.optimization import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Linear(80, 3000, bias=False))
    opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.0)
    model(torch.randn(2, 96)).sum().backward()
    opt.step()
    for p in model.parameters():
        state = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                 for k, v in opt.state[p].items() if k != "step"}  # fmt: skip
        assert state == moment_layouts(name, tuple(p.shape)), (name, tuple(p.shape))
