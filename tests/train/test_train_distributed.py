"""Two processes over gloo (DDP and FSDP) take the same steps as one process accumulating two micro-batches."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from slimlm.train.config import TrainConfig
from slimlm.train.trainer import train
from tests.train.conftest import qa_records, write_jsonl

STRATEGIES = ("ddp", "fsdp")


def settings(model_dir, data, out, **extra) -> TrainConfig:
    return TrainConfig(data=[str(data)], output_dir=str(out), model=str(model_dir), lr=1e-2, batch_size=2,
                       lora_rank=4, lora_dropout=0.0, max_steps=3, progress=False, eval_fraction=0.2, **extra)  # fmt: skip


def _worker(rank: int, world: int, port: int, model_dir, data, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")  # one group for both runs: process start-up is the slow part
    try:
        for strategy in STRATEGIES:
            train(settings(model_dir, data, out / strategy, distributed=strategy))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh processes import torch: ~25 s on the busy 2-core machine
def test_two_processes_match_one_process_with_accumulation(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(24))
    single = train(settings(tiny_model_dir, data, tmp_path / "single", grad_accum=2))
    mp.spawn(_worker, args=(2, free_port(), tiny_model_dir, data, tmp_path / "multi"), nprocs=2)
    ours = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    lora_b = [k for k in ours if "lora_B" in k]
    assert any(ours[k].abs().max() > 1e-4 for k in lora_b)  # training moved the adapters
    for strategy in STRATEGIES:
        theirs = load_file(str(tmp_path / "multi" / strategy / "adapter_model.safetensors"))
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=1e-4, atol=1e-5, msg=f"{strategy}: {key}")
        summary = json.loads((tmp_path / "multi" / strategy / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == single.state.step == 3
