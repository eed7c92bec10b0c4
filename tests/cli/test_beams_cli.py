"""--num-beams is bounded, checked against the KV budget and shows progress (issue 22, item 9)."""

from __future__ import annotations

import pytest

from slimlm.cli import main
from slimlm.engine.beam import MAX_NUM_BEAMS
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError


def test_too_many_beams_is_refused_before_loading(capsys):
    # a model path that does not exist: the beam count is checked first, so nothing is loaded
    assert main(["generate", "hi", "--num-beams", "100000", "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err == f"error: --num-beams 100000 is too many: at most {MAX_NUM_BEAMS}\n"


def test_beams_must_fit_the_kv_budget(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", progress=False, kv_cache_tokens=64)
    with pytest.raises(
        SlimlmError, match=r"8 beams x \(2 prompt \+ 20 new tokens\) = 176 KV tokens, but the KV budget is 64"
    ):
        llm.generate("hi", SamplingParams(num_beams=8, max_tokens=20, temperature=0))
    out = llm.generate("hi", SamplingParams(num_beams=2, max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 20
    with pytest.raises(SlimlmError, match="exceed the context limit 256"):
        llm.generate("hi", SamplingParams(num_beams=2, max_tokens=300, temperature=0))


def test_beam_search_shows_progress(tiny_model_dir, capsys, monkeypatch):
    import slimlm.progress

    monkeypatch.setattr(slimlm.progress, "PLAIN_EVERY_S", 0.0)  # a line per step instead of every 10 s
    args = [
        "generate",
        "hi",
        "--model",
        str(tiny_model_dir),
        "--num-beams",
        "3",
        "--max-tokens",
        "5",
        "--ignore-eos",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "beam search (3 beams): 5/5" in err
    assert main([*args, "--quiet"]) == 0
    assert "beam search" not in capsys.readouterr().err
