"""`slimlm bench`'s runner: each workload on the layout the commands pick, medians, clear errors."""

from __future__ import annotations

import pytest

from slimlm.bench.run import ratio_rows, run_bench
from slimlm.errors import SlimlmError


def test_slimlm_bench_measures_every_workload_on_the_c_kernel_where_it_runs():
    lines = []
    r = run_bench(
        None, "bfloat16", ("slimlm",), runs=1, concurrency=2, prompt_len=8, gen_len=4, log=lines.append
    )
    assert r["weights_layout"] == {"batch-1": "plain", "concurrent": "plain"}
    assert r["decode_kernel"] == {"batch-1": "C kernel", "concurrent": "C kernel"}
    s = r["systems"]["slimlm"]
    assert s["ttft_s"] > 0 and s["decode_tok_s"] > 0 and s["throughput_tok_s"] > 0
    assert len(s["runs"]["decode_tok_s"]) == 1
    assert "plain (batch-1) / plain (concurrent); decode steps on C kernel" in lines[0]
    assert ratio_rows(r)[0][0] == "slimlm"


def test_slimlm_bench_on_the_pytorch_path_measures_batch1_on_plain_and_concurrency_on_packed():
    r = run_bench(None, "bfloat16", ("slimlm",), runs=1, concurrency=2, prompt_len=8, gen_len=4,
                  log=lambda _: None, decode_kernel="torch")  # fmt: skip
    assert r["weights_layout"] == {"batch-1": "plain", "concurrent": "packed"}
    assert r["decode_kernel"]["concurrent"] == "torch (asked for)"


def test_one_layout_for_everything_when_asked():
    r = run_bench(None, "float32", ("slimlm",), runs=1, concurrency=2, prompt_len=8, gen_len=2, log=lambda _: None,
                  weights_layout="both")  # fmt: skip
    assert r["weights_layout"] == {"batch-1": "both", "concurrent": "both"}


def test_bad_peers_and_layouts_are_refused_before_loading():
    with pytest.raises(SlimlmError, match="unknown peer"):
        run_bench(None, "bfloat16", ("vllm",))
    with pytest.raises(SlimlmError, match="unknown weights layout 'fast'"):
        run_bench(None, "bfloat16", ("slimlm",), weights_layout="fast")
    with pytest.raises(SlimlmError, match="unknown decode kernel 'cuda'"):
        run_bench(None, "bfloat16", ("slimlm",), decode_kernel="cuda")
