"""benchmarks/load_bench.py: its in-process measurement returns sane numbers (slimlm, bf16 only: ~10 s)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "load_bench.py"


@pytest.fixture(scope="module")
def load_bench():
    spec = importlib.util.spec_from_file_location("load_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_slimlm_bf16(load_bench, smollm_path):
    r = load_bench.measure("slimlm", "bfloat16", threads=torch.get_num_threads(), model_path=smollm_path,
                           keep_model=True)  # fmt: skip
    model = r.pop("model")
    assert r["loader"] == "slimlm" and r["dtype"] == "bfloat16" and r["param_dtypes"] == ["bfloat16"]
    assert 0 < r["load_seconds"] < 300
    expected = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert r["tensor_bytes"] == pytest.approx(expected, rel=0.01)
    assert 200 * 2**20 < r["tensor_bytes"] < 320 * 2**20  # 134.5M parameters, 2 bytes each, embeddings tied
    # In the test process the RSS is not the load's own, but it must be consistent.
    assert 0 < r["rss_before_load_bytes"] and 0 < r["rss_after_load_bytes"] <= r["peak_rss_bytes"]
    assert r["peak_rss_bytes"] >= r["tensor_bytes"]


def test_ratios_and_markdown(load_bench):
    runs = {
        loader: [dict(loader=loader, dtype="bfloat16", threads=2, param_dtypes=["bfloat16"], load_seconds=s,
                      peak_rss_bytes=p * 2**20, rss_after_load_bytes=p * 2**20 // 2, rss_before_load_bytes=1,
                      tensor_bytes=257 * 2**20) for s, p in vals]
        for loader, vals in {"slimlm": [(1.0, 900), (3.0, 1000), (2.0, 950)], "transformers": [(4.0, 800)]}.items()
    }  # fmt: skip
    rows = [load_bench.summarize(runs["slimlm"]), load_bench.summarize(runs["transformers"])]
    load_bench.add_ratios(rows)
    assert rows[0]["load_seconds"] == 2.0 and rows[0]["load_seconds_vs_transformers"] == 0.5
    assert rows[0]["peak_rss_bytes_vs_transformers"] == pytest.approx(950 / 800, abs=1e-3)
    assert rows[1]["load_seconds_vs_transformers"] == 1.0
    report = dict(command="python benchmarks/load_bench.py", threads=2, repeats=3, cpu_model="cpu", cpu_count=2,
                  versions={"torch": "t", "transformers": "x"}, notes=["n"], rows=rows)  # fmt: skip
    md = load_bench.markdown(report)
    assert "| slimlm | bfloat16 | 2.00 | 950 | 475 | 257 | 0.50x | 1.19x | 1.19x |" in md
