"""FSDP2 with the 8-bit, 4-bit and factored 4-bit optimizers on 2 gloo processes: the same loss curve as one
process accumulating two micro-batches, half the optimizer state per rank, and checkpoints that resume on
2 ranks bit for bit and on 1 process after resharding the low-bit states."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from slimlm.errors import SlimlmError
from slimlm.optim import AdamW4bit, AdamW8bit, AdamWFactor4bit, optimizer_state_bytes
from slimlm.train.checkpoint import checkpoint_path
from slimlm.train.config import TrainConfig
from slimlm.train.trainer import Trainer
from tests.train.conftest import qa_records, write_jsonl
from tests.train.test_train_distributed import free_port

OPTIMIZERS = ("adamw8bit", "adamw4bit", "factor4bit")
STEPS, SAVE_AT = 50, 25


def settings(model_dir, data, out, **extra) -> TrainConfig:
    # Full fine-tuning: the tiny model's MLP and embedding matrices are large enough for low-bit states.
    base = dict(data=[str(data)], output_dir=str(out), model=str(model_dir), method="full", lr=3e-3, batch_size=2,
                max_steps=STEPS, save_every=SAVE_AT, keep_checkpoints=5, warmup_steps=2, progress=False,
                eval_fraction=0.1, measure_memory=False)  # fmt: skip
    return TrainConfig(**{**base, **extra})


def run(cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
        return {"losses": result.losses, "state_bytes": optimizer_state_bytes(trainer.optimizer)}
    finally:
        trainer.close()


def _worker(rank: int, world: int, port: int, model_dir, data, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        results = {}
        for optim in OPTIMIZERS:
            results[optim] = run(settings(model_dir, data, out / optim, optim=optim, distributed="fsdp"))
        # the same 2 ranks resume from the middle: the shards load as saved
        resume = str(checkpoint_path(out / "factor4bit", SAVE_AT))
        cfg = settings(
            model_dir, data, out / "resumed2", optim="factor4bit", distributed="fsdp", resume=resume
        )
        results["resumed2"] = run(cfg)
        # torch AdamW under FSDP too (a full state dict keyed by name): a short run for the 1-process resume
        cfg = settings(
            model_dir, data, out / "adamw", optim="adamw", distributed="fsdp", max_steps=6, save_every=3
        )
        results["adamw"] = run(cfg)
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp-lowbit")
    data = write_jsonl(tmp / "qa.jsonl", qa_records(40))
    mp.spawn(_worker, args=(2, free_port(), tiny_model_dir, data, tmp / "multi"), nprocs=2)
    ranks = [json.loads((tmp / "multi" / f"rank{r}.json").read_text()) for r in range(2)]
    single = {
        o: run(settings(tiny_model_dir, data, tmp / "single" / o, optim=o, grad_accum=2)) for o in OPTIMIZERS
    }
    return tmp, data, ranks, single


# 8-bit and factored: blocks of 256 / 128 elements never straddle the tiny model's shard boundaries and the
# factored statistics are summed over ranks, so both match one process up to the reduction order. 4-bit's
# rank-1 normalizer takes column maxima over each shard's rows only: other scales, a slightly other curve.
TOLERANCE = {"adamw8bit": 1e-4, "factor4bit": 1e-4, "adamw4bit": 0.02}


@pytest.mark.slow  # 2 fresh processes, 4 x 50 FSDP steps and 3 x 50 single-process steps: ~80 s of CPU
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_fsdp_loss_curve_matches_one_process(runs, optim):
    _, _, ranks, single = runs
    ours, reference = torch.tensor(ranks[0][optim]["losses"]), torch.tensor(single[optim]["losses"])
    assert ranks[0][optim]["losses"] == ranks[1][optim]["losses"]  # every rank reports the global loss
    assert len(ours) == len(reference) == STEPS
    assert (
        reference[-5:].mean() < reference[:5].mean() - 0.5
    )  # the run learns: the comparison means something
    torch.testing.assert_close(ours, reference, rtol=0, atol=TOLERANCE[optim])


@pytest.mark.slow
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_fsdp_optimizer_state_is_halved_per_rank(runs, optim):
    _, _, ranks, single = runs
    per_rank = [r[optim]["state_bytes"] for r in ranks]
    whole = single[optim]["state_bytes"]
    for b in per_rank:
        assert 0.4 * whole < b < 0.6 * whole, (per_rank, whole)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_two_ranks_exactly_and_on_one_process(runs, tiny_model_dir):
    tmp, data, ranks, _ = runs
    uninterrupted = ranks[0]["factor4bit"]["losses"]
    assert ranks[0]["resumed2"]["losses"] == uninterrupted[SAVE_AT:]  # same shards: bit for bit
    step = checkpoint_path(tmp / "multi" / "factor4bit", SAVE_AT)
    assert sorted(p.name for p in step.glob("optimizer_rank*.pt")) == [
        "optimizer_rank0.pt",
        "optimizer_rank1.pt",
    ]
    for optim in ("factor4bit", "adamw8bit"):
        resume = str(checkpoint_path(tmp / "multi" / optim, SAVE_AT))
        # one process accumulating 2 micro-batches continues the 2-rank run (the same global batch)
        one = run(
            settings(
                tiny_model_dir, data, tmp / f"resumed1-{optim}", optim=optim, grad_accum=2, resume=resume
            )
        )
        expected = torch.tensor(ranks[0][optim]["losses"][SAVE_AT:])
        torch.testing.assert_close(torch.tensor(one["losses"]), expected, rtol=0.01, atol=0.01)


def test_offload_needs_a_low_bit_optimizer_or_fsdp(tiny_model_dir, tmp_path):
    with pytest.raises(SlimlmError, match="--offload-optimizer"):
        settings(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "o", optim="adamw", offload_optimizer=True)


@pytest.mark.gpu
@pytest.mark.parametrize("optim_cls", [AdamW8bit, AdamW4bit, AdamWFactor4bit])
def test_offloaded_states_stay_on_the_cpu_and_give_the_same_steps(optim_cls):
    torch.manual_seed(0)
    weights = [torch.randn(96, 64, device="cuda") for _ in range(2)]
    grads = [torch.randn(96, 64, device="cuda") for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optims = [optim_cls([params[0]], lr=1e-2), optim_cls([params[1]], lr=1e-2, state_device="cpu")]
    for g in grads:
        for p, opt in zip(params, optims, strict=True):
            p.grad = g.clone()
            opt.step()
    assert all(t.device.type == "cpu" for t in optims[1].state[params[1]].values())
    assert all(t.device.type == "cuda" for k, t in optims[0].state[params[0]].items() if k != "step")
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=0)


@pytest.mark.slow
def test_two_rank_torch_adamw_checkpoint_resumes_in_one_process(runs, tiny_model_dir):
    tmp, data, ranks, _ = runs
    resume = str(checkpoint_path(tmp / "multi" / "adamw", 3))
    cfg = settings(tiny_model_dir, data, tmp / "resumed1-adamw", optim="adamw", grad_accum=2, resume=resume,
                   max_steps=6, save_every=3)  # fmt: skip
    one = run(cfg)
    expected = torch.tensor(ranks[0]["adamw"]["losses"][3:])
    torch.testing.assert_close(torch.tensor(one["losses"]), expected, rtol=1e-4, atol=1e-4)
