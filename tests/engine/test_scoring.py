"""Prompt scoring (slimlm.engine.scoring) against transformers' own forward on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from slimlm.engine.scoring import prompt_logprobs
from slimlm.errors import SlimlmError
from tests.tiny_models import make_hf_model, slimlm_from_hf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_logprobs_equal_transformers(arch, monkeypatch):
    pytest.importorskip("transformers")
    import slimlm.engine.scoring as scoring

    monkeypatch.setattr(scoring, "_LOGITS_ROWS", 5)  # several chunks on a short prompt
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    entries = prompt_logprobs(model, ids, top=3)
    assert entries[0] is None and len(entries) == len(ids)
    for pos, entry in enumerate(entries[1:], start=1):
        row = ref[pos - 1]
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(row[ids[pos]].item(), abs=1e-4)
        top_vals, top_ids = row.topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_one_token_and_empty_prompts():
    model = slimlm_from_hf(make_hf_model("llama"))
    assert prompt_logprobs(model, [5]) == [None]
    with pytest.raises(SlimlmError, match="empty"):
        prompt_logprobs(model, [])
