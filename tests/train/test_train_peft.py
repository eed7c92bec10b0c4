"""The adapter is PEFT's format: HF PEFT loads it and agrees with `slimlm merge`'s checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.loading import load
from slimlm.train.config import TrainConfig
from slimlm.train.merge import merge_adapter
from slimlm.train.trainer import Trainer
from tests.train.conftest import qa_records, write_jsonl


def trained(model_dir, tmp_path, method: str) -> Trainer:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(16))
    cfg = TrainConfig(data=[str(data)], output_dir=str(tmp_path / f"{method}-out"), model=str(model_dir), method=method,
                      lr=2e-2, batch_size=4, lora_rank=4, lora_dropout=0.0, max_steps=3, progress=False,
                      lora_targets=("q_proj", "v_proj", "down_proj"))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.run()
    trainer.model.eval()
    return trainer


def test_peft_loads_the_adapter_and_matches_the_merged_model(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    trainer = trained(tiny_model_dir, tmp_path, "lora")
    adapter_dir = tmp_path / "lora-out"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()

    ids = torch.randint(0, 128, (2, 11))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
        peft_logits = peft_model(input_ids=ids).logits
        ours = trainer.model.forward_dense(ids)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(peft_logits, ours, rtol=1e-4, atol=1e-4)

    assert main(["merge", str(adapter_dir), "--output", str(tmp_path / "merged"), "--quiet"]) == 0
    merged = load(str(tmp_path / "merged"), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(merged.model.forward_dense(ids), peft_logits, rtol=1e-4, atol=1e-4)


def test_qlora_adapter_merges_into_the_base_it_was_trained_on(tiny_model_dir, tmp_path):
    trainer = trained(tiny_model_dir, tmp_path, "qlora")
    notes = json.loads((tmp_path / "qlora-out" / "slimlm_adapter.json").read_text())
    assert notes["base_quantization"]["bits"] == 4
    merge_adapter(tmp_path / "qlora-out", tmp_path / "merged", progress=False)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        merged = load(str(tmp_path / "merged"), progress=False).model.forward_dense(ids)
        ours = trainer.model.forward_dense(ids)
    # the 4-bit kernel computes in bfloat16, the merged float model in float32
    torch.testing.assert_close(merged, ours, rtol=3e-2, atol=3e-2)


def test_merge_refuses_a_non_empty_output_and_bad_adapters(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(SlimlmError, match="not a LoRA adapter"):
        merge_adapter(tmp_path / "adapter", tmp_path / "new", model=str(tiny_model_dir))
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True})
    )
    with pytest.raises(SlimlmError, match="use_dora"):
        merge_adapter(tmp_path / "adapter", tmp_path / "new", model=str(tiny_model_dir))
    with pytest.raises(SlimlmError, match="not empty"):
        merge_adapter(tmp_path / "adapter", tmp_path / "out", model=str(tiny_model_dir))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
