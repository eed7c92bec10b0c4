"""`slimlm quantize` with every default works on a model whose widths 128 does not divide (issue 22, item 10)."""

from __future__ import annotations

import json

from slimlm.cli import main
from slimlm.loading import load


def test_default_group_size_is_the_largest_that_divides_every_width(tiny_model_dir, tmp_path, capsys):
    # the tiny Llama: hidden 64, MLP 96 -> 128 and 64 leave a remainder somewhere, 32 divides all
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["hidden_size"] % 128 and config["intermediate_size"] % 64
    assert (
        main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(tmp_path / "q")])
        == 0
    )
    err = capsys.readouterr().err
    assert "w4 g32" in err and "group size 32: the largest of 128/64/32 dividing every input width" in err
    loaded = load(str(tmp_path / "q"), progress=False)
    assert loaded.config.quantization["group_size"] == 32


def test_a_group_size_that_does_not_fit_names_those_that_do(tiny_model_dir, tmp_path, capsys):
    args = [
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--method",
        "rtn",
        "--quiet",
        "--out",
        str(tmp_path / "q"),
    ]
    assert main([*args, "--group-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group size 64 does not divide the 96 input features" in err
    assert "group sizes that fit this model: 32, -1" in err
    assert not (tmp_path / "q").exists()
