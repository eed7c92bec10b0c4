"""A float HF checkpoint's file pages do not stay resident beside the loaded copy (loading/file_pages.py).

One safetensors file per model (as SmolLM2-1.7B ships): before, every page read stayed mapped until the
file was closed after its last tensor, so a load peaked at the weights plus the whole file (+118 MiB on
this test's 118 MB file, 7 GB for a 1.7B bf16 model); now each block's pages are dropped once copied."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimlm.bench.models import SMOLLM2_1_7B, build_synthetic

PROBE = """
import sys
from pathlib import Path
def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
import torch
from slimlm.loading import load
from slimlm.tokenizer import Tokenizer
Tokenizer.from_hf_dir(sys.argv[1])  # the tokenizer's own first-build cost, outside the measured load
Path("/proc/self/clear_refs").write_text("5")
loaded = load(sys.argv[1], dtype="bfloat16", progress=False)
weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(status("VmHWM") - status("VmRSS"), weights)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_float_load_peaks_well_under_weights_plus_file(tmp_path):
    config = {**SMOLLM2_1_7B, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64}  # fmt: skip
    model_dir = build_synthetic(tmp_path / "m", config)
    file_bytes = (model_dir / "model.safetensors").stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    above_end, weights = map(int, done.stdout.split())
    assert weights > 0.9 * file_bytes  # the file is the weights
    # the peak of the load above what it ends with: the old loader held the whole file (118 MB) here
    assert above_end < 0.35 * file_bytes, (above_end / 2**20, file_bytes / 2**20)
