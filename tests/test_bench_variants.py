"""`slimlm bench --variants` (slimlm/bench/variants.py): a variant name it does not know is one clear error."""

import subprocess
import sys

import pytest

from slimlm.bench.variants import VARIANTS, run_variants
from slimlm.errors import SlimlmError


def test_an_unknown_variant_is_a_slimlm_error_naming_the_choices():
    with pytest.raises(SlimlmError, match="unknown --variants w3g64: choose from bf16, native"):
        run_variants(["bf16", "w3g64"], threads=2, runs=1, gen_len=4, prompt_len=8)
    assert "w4g64" in VARIANTS and "llama.cpp" in VARIANTS


def test_the_cli_says_so_in_one_line_without_a_traceback():
    done = subprocess.run([sys.executable, "-m", "slimlm.cli", "bench", "--variants", "w3g64"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "unknown --variants w3g64" in done.stderr
    assert "Traceback" not in done.stderr
