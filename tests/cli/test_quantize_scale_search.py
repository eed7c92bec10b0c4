"""`slimlm quantize --scale-search`: the option reaches the checkpoint, and bad combinations are one-line
errors (tests/test_quant_search.py checks the search itself)."""

from __future__ import annotations

import json

from slimlm.cli import main


def test_cli_scale_search(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "imx"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--scale-search", "imatrix",
            "--group-size", "32", "--calib-samples", "2", "--calib-seqlen", "64", "-q", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["scale_search"] == "imatrix" and qconfig["calibration"] == "default"
    bad = ["quantize", "--model", str(tiny_model_dir), "--method", "awq", "--scale-search", "mse",
           "--out", str(tmp_path / "never")]  # fmt: skip
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "applies to --method rtn, gptq and awq-gptq" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()
