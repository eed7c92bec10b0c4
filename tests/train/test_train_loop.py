"""The training loop on a tiny model: learning, exact resume, accumulation, outputs and refusals."""

from __future__ import annotations

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.loading import load
from slimlm.train.batching import epoch_batches
from slimlm.train.checkpoint import list_checkpoints
from slimlm.train.config import TrainConfig
from slimlm.train.trainer import Trainer, train
from tests.train.conftest import qa_records, write_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", qa_records(40))


def config(model_dir, data_file, out, **overrides) -> TrainConfig:
    settings = dict(data=[str(data_file)], output_dir=str(out), model=str(model_dir), lr=1e-2, batch_size=4,
                    eval_fraction=0.2, lora_rank=4, progress=False, max_steps=6)  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(
    ("method", "optim"), [("full", "adamw"), ("lora", "adamw8bit"), ("qlora", "factor4bit")]
)
def test_held_out_loss_drops(tiny_model_dir, data_file, tmp_path, method, optim):
    result = train(config(tiny_model_dir, data_file, tmp_path / "out", method=method, optim=optim, max_steps=12,
                          lr=3e-3 if method == "full" else 2e-2, gradient_checkpointing=method == "qlora"))  # fmt: skip
    before, after = result.evals[0]["eval_loss"], result.evals[-1]["eval_loss"]
    assert after < before - 0.05, (before, after)
    assert result.measured_peak_bytes and result.peak_rss_bytes and result.planned_peak_bytes


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_model_dir, data_file, tmp_path):
    settings = dict(
        lora_dropout=0.2, optim="adamw4bit", grad_accum=2, save_every=3, keep_checkpoints=5, batch_size=2
    )
    full = train(config(tiny_model_dir, data_file, tmp_path / "a", **settings))
    assert len(full.losses) == 6
    step3 = [p for p in list_checkpoints(tmp_path / "a") if p.name == "step-000003"][0]
    resumed = train(config(tiny_model_dir, data_file, tmp_path / "b", resume=str(step3), **settings))
    assert resumed.losses == full.losses[3:]  # bit for bit: weights, optimizer, schedule, RNG, data position
    assert resumed.state.step == 6

    # --resume without a path picks the newest checkpoint of the output directory (step 6): nothing left to do
    again = train(config(tiny_model_dir, data_file, tmp_path / "a", resume=True, **settings))
    assert again.losses == [] and again.state.step == 6


def test_resume_from_a_mismatched_checkpoint_is_refused_and_writes_nothing(
    tiny_model_dir, data_file, tmp_path
):
    train(config(tiny_model_dir, data_file, tmp_path / "a", max_steps=2))
    before = listing(tmp_path / "a")
    with pytest.raises(SlimlmError, match=r"different settings: --lora-rank \(4 in the checkpoint, 8 now\)"):
        Trainer(config(tiny_model_dir, data_file, tmp_path / "a", max_steps=2, lora_rank=8, resume=True))
    other_data = write_jsonl(tmp_path / "other.jsonl", qa_records(30))
    with pytest.raises(SlimlmError, match="the training data"):
        Trainer(config(tiny_model_dir, other_data, tmp_path / "a", max_steps=2, resume=True))
    assert listing(tmp_path / "a") == before


def test_non_empty_output_dir_needs_overwrite(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="not empty; pass --resume .* --overwrite"):
        Trainer(config(tiny_model_dir, data_file, out))
    assert listing(out) == ["notes.txt"]
    with pytest.raises(SlimlmError, match="no checkpoint"):
        Trainer(config(tiny_model_dir, data_file, out, resume=True))
    train(config(tiny_model_dir, data_file, out, overwrite=True, max_steps=1))
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()


def test_bad_settings_fail_before_loading(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(SlimlmError, match="--optim 'sgd' is not one of"):
        config(tiny_model_dir, data_file, tmp_path, optim="sgd")
    with pytest.raises(SlimlmError, match="do not exist in this model"):
        Trainer(config(tiny_model_dir, data_file, tmp_path / "x", lora_targets=("c_attn",)))
    with pytest.raises(SlimlmError, match="rank 40 is larger"):
        Trainer(config(tiny_model_dir, data_file, tmp_path / "x", lora_rank=40))
    assert not (tmp_path / "x").exists()


def test_accumulation_gives_the_step_of_one_big_batch(tiny_model_dir, data_file, tmp_path):
    one = Trainer(config(tiny_model_dir, data_file, tmp_path / "a", batch_size=4, lora_dropout=0.0))
    two = Trainer(
        config(tiny_model_dir, data_file, tmp_path / "b", batch_size=2, grad_accum=2, lora_dropout=0.0)
    )
    rows = epoch_batches(one.train_examples, 4, "bucket", 512, seed=0, epoch=0)[0]
    loss_one, _, _ = one._train_step([rows])
    loss_two, _, _ = two._train_step([rows[:2], rows[2:]])
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    p_one, p_two = dict(one.model.named_parameters()), dict(two.model.named_parameters())
    for name, p in p_one.items():
        if p.requires_grad:
            torch.testing.assert_close(p_two[name], p, rtol=1e-5, atol=1e-6)


def test_full_fine_tuning_writes_a_checkpoint_the_engine_loads(tiny_model_dir, data_file, tmp_path):
    trainer = Trainer(config(tiny_model_dir, data_file, tmp_path / "out", method="full", max_steps=2))
    trainer.run()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        expected = trainer.model.forward_dense(ids)
        served = load(str(tmp_path / "out"), progress=False)
        torch.testing.assert_close(served.model.forward_dense(ids), expected)
    assert served.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).endswith("assistant\n")


def test_bf16_mixed_keeps_fp32_master_weights_and_learns(tiny_model_dir, data_file, tmp_path):
    trainer = Trainer(
        config(tiny_model_dir, data_file, tmp_path / "out", precision="bf16-mixed", max_steps=12, lr=2e-2)
    )
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}  # fp32 adapters, bf16 frozen base
    result = trainer.run()
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"] - 0.05
