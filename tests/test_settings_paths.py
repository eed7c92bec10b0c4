"""A setting keeps one name and one check from the flag to its use: --kv-dtype, --decode-kernel and
--cache-max-entry-count are EngineConfig fields of the same name (the flag is generated from the field), and
a bad value's one-line error is the one EngineConfig raises (the KV dtype's comes from kv_dtype_name)."""

from __future__ import annotations

import dataclasses

import pytest

from slimlm.cli import build_parser, main
from slimlm.engine.config import EngineConfig
from slimlm.errors import SlimlmError

CASES = [
    ("--kv-dtype", "kv_dtype", "int3", "kv_dtype_name"),
    ("--decode-kernel", "decode_kernel", "cuda", "__post_init__"),
    ("--cache-max-entry-count", "cache_max_entry_count", "1.5", "__post_init__"),
]


@pytest.mark.parametrize(("flag", "field", "bad", "checker"), CASES)
def test_flag_is_the_field_and_its_error_comes_from_one_check(capsys, flag, field, bad, checker):
    parser = build_parser("generate")
    sub = parser.commands["generate"]
    action = next(a for a in sub._actions if flag in a.option_strings)
    assert action.dest == field and field in {f.name for f in dataclasses.fields(EngineConfig)}
    value = float(bad) if field == "cache_max_entry_count" else bad
    with pytest.raises(SlimlmError) as direct:
        EngineConfig(**{field: value})
    assert direct.traceback[-1].frame.code.name == checker
    assert main(["generate", flag, bad, "--max-tokens", "1", "hello"]) == 2
    assert capsys.readouterr().err == f"error: {direct.value}\n"
