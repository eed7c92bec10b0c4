"""End to end on the real SmolLM2-135M: a few LoRA steps on conversations built from CPython's pydoc text."""

from __future__ import annotations

import json
import math

import pytest

from slimlm.train.config import TrainConfig
from slimlm.train.trainer import train


def pydoc_conversations(n: int) -> list[dict]:
    """'Explain the Python topic X' -> the first sentence of topic X (text nobody here wrote)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics)[:n]:
        blocks = [b for b in topics[key].split("\n\n")[1:] if b.strip() and not b.startswith(" ")]
        first = " ".join(blocks[0].split()).split(". ")[0] + "."
        out.append({"conversation": [{"input": f"Explain the Python topic {key!r}.", "output": first}]})
    return out


@pytest.mark.slow
def test_lora_on_smollm2_learns_and_saves_a_peft_adapter(smollm_path, tmp_path):
    from slimlm.loading import load

    data = tmp_path / "pydoc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pydoc_conversations(6)))
    loaded = load(None, dtype="float32", progress=False)  # our own copy: LoRA changes the model in place
    cfg = TrainConfig(data=[str(data)], output_dir=str(tmp_path / "out"), lr=2e-3, batch_size=2, max_seq_len=80,
                      lora_rank=4, lora_targets=("q_proj", "v_proj"), lora_dropout=0.0, epochs=2, eval_fraction=0.34,
                      warmup_steps=0, schedule="constant", progress=False)  # fmt: skip
    result = train(cfg, loaded)
    assert result.state.step == 4 and all(math.isfinite(x) for x in result.losses)
    # the second epoch sees the same 4 conversations again: they got easier
    assert sum(result.losses[2:]) < sum(result.losses[:2])
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert len(adapter) == 30 * 2 * 2
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 576)
    assert result.planned_peak_bytes and result.measured_peak_bytes
