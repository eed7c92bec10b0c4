"""A file under the kernel cache's name that is not slimlm's library is rebuilt, not an internal error.

Each load runs in a fresh process: dlopen hands a process the library it already loaded from a path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimlm.kernels import build

ROOT = Path(__file__).resolve().parents[2]
LOAD = (
    "from slimlm.kernels.library import library\n"
    "lib, what = library(needs_bf16=True, needs_int=False, require_fast=False)\n"
    "print(what, lib is not None and hasattr(lib, 'slim_decode'))\n"
)


def load_in_a_new_process(cache: Path) -> str:
    # -O0 after -O3: a quick build, since only the cache logic is under test
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SLIMLM_KERNEL_CACHE": str(cache),
        "SLIMLM_KERNEL_CFLAGS": "-O0",
    }
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _foreign_library(tmp_path) -> bytes:
    """A valid shared object that exports none of slimlm's functions."""
    (tmp_path / "other.c").write_text("int other_function(void) { return 7; }\n")
    subprocess.run([build._compiler(), "-shared", "-fPIC", "-o", str(tmp_path / "other.so"), str(tmp_path / "other.c")],
                   check=True)  # fmt: skip
    return (tmp_path / "other.so").read_bytes()


@pytest.mark.skipif(build._compiler() is None, reason="needs a C compiler")
def test_a_file_that_is_not_our_library_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    assert load_in_a_new_process(cache).endswith("True")
    (target,) = cache.glob("decode_cpu-*.so")
    for content in (_foreign_library(tmp_path), b"not an ELF file"):
        target.unlink()
        target.write_bytes(content)
        # the foreign library used to end in AttributeError: undefined symbol: slim_fast_path
        assert load_in_a_new_process(cache).endswith("True")
        assert target.read_bytes() != content
