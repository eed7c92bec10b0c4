"""The planner's training peak against the measured tensor-memory peak of real steps (tiny random Llama).

Measured with `TensorMemoryTracker` (live tensor storages, op by op) around HF transformers'
LlamaForCausalLM, the same method as benchmarks/plan_vs_measured.py uses on SmolLM2-135M.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimlm.config import ModelConfig
from slimlm.plan.devices import Device
from slimlm.plan.measure import TensorMemoryTracker
from slimlm.plan.measure_training import measure_training_step
from slimlm.plan.training import TrainingSettings, plan_training

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
CPU = Device("cpu", 2**40, 2**40, "cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight the other tests for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


def test_tracker_counts_storages_once_and_releases_them():
    tracker = TensorMemoryTracker()
    kept = torch.zeros(10)
    tracker.track_existing([kept, kept.view(2, 5)])
    assert tracker.current == 40
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:20]
        a.add_(1)  # in place: nothing new
        b = a * 2  # 4000 more
        assert tracker.current == 40 + 8000
        del a, b
        assert tracker.current == 40 + 4000  # the view keeps a's storage
        del view
        c = kept.view(5, 2) + 1  # a view of a tracked tensor is not new; the sum is
    assert tracker.current == 40 + 40 and c.numel() == 10
    assert tracker.peak == 40 + 8000


def test_tracker_sees_tensors_saved_for_backward():
    x = torch.randn(256, requires_grad=True)
    tracker = TensorMemoryTracker()
    tracker.track_existing([x])
    with tracker:
        y = x.exp()  # exp saves its output for backward
        z = (y * 3).sum()
        del y
        saved = tracker.current
        z.backward()
    assert saved >= 2 * 1024  # x and exp(x) stay alive through the graph
    assert tracker.current == 2 * 1024 + 4  # after backward: x, its gradient and the scalar z


CASES = [
    dict(method=m, precision=p, gradient_checkpointing=c)
    for m in ("full", "lora")
    for p in ("fp32", "bf16")
    for c in (False, True)
] + [
    dict(method="full", precision="mixed"),
    dict(method="lora", precision="mixed", gradient_checkpointing=True),
    dict(method="lora", precision="fp32", lora_dropout=0.05),  # slimlm train's default dropout
    dict(method="lora", precision="bf16", lora_dropout=0.05),
    dict(method="lora", precision="fp32", gradient_checkpointing=True, lora_dropout=0.1),
    dict(method="full", precision="fp32", flash_attention=False),
    dict(method="full", precision="fp32", optimizer="sgd"),
    dict(method="full", precision="bf16", grad_accumulation=2),
    dict(method="full", precision="fp32", optimizer="adamw8bit"),
    dict(method="full", precision="bf16", optimizer="adamw4bit"),
    dict(method="full", precision="fp32", optimizer="adamw4bit-factor"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_predicted_peak_within_10_percent_of_measured(case, tiny_llama):
    if case.get("optimizer", "adamw").startswith("adamw") and case.get("optimizer", "adamw") != "adamw":
        pytest.importorskip("slimlm.optim.variants")
    settings = TrainingSettings(micro_batch=2, seq_len=48, lora_rank=4, **case)
    config = ModelConfig.from_hf_dict({**TINY, "architectures": ["LlamaForCausalLM"]})
    plan = plan_training(config, CPU, settings)
    measured = measure_training_step(copy.deepcopy(tiny_llama), settings, TINY["vocab_size"])
    assert plan.total_bytes == pytest.approx(measured.peak_bytes, rel=0.10), (plan.peak_phase, plan.phases)
