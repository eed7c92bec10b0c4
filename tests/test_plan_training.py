"""Training planning: the classic worked examples, ZeRO sharding, optimizer states, and bad settings."""

from __future__ import annotations

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.plan.devices import Device
from slimlm.plan.inference import weight_bytes
from slimlm.plan.models import resolve_model
from slimlm.plan.optimizers import optimizer_state_bytes, tensor_state_bytes
from slimlm.plan.shapes import model_params
from slimlm.plan.training import (
    ModelStates,
    TrainingSettings,
    model_states,
    plan_training,
    shard,
    suggest_training,
)
from slimlm.plan.units import GB

BIG = Device("big", 10**15, 10**15, "gpu", 0)


def test_llama_6b_classic_weights_and_adamw_states():
    """Classic: 6 B parameters -> 24 GB in fp32, 6 GB in int8, AdamW's two fp32 states 48 GB.
    The classic arithmetic assumes every parameter is int8 and ignores scales; slimlm's w8 keeps the
    norms in bf16 (the embeddings too with --keep-embeddings-float) and stores a bf16 scale per output
    channel, and AdamW keeps a 4-byte step counter per tensor."""
    psi = 6 * 10**9
    assert optimizer_state_bytes([(psi,)], "adamw", 4) == 48 * GB + 4
    llama = resolve_model("llama-2-7b").config  # "LLaMA-6B/7B": 6.74 B parameters
    n = llama.num_parameters()
    assert weight_bytes(llama, "fp32") == 4 * n  # 26.95 GB: the classic number for 6.74 B
    # per channel everywhere, the table too (the w8 default table is int8 g32 since issue 15: not classic)
    w8 = weight_bytes(llama, "w8", -1, quantize_embeddings=True, embedding_group_size=-1)
    classic_w8 = n  # 1 byte per parameter
    scales = 2 * (32 * (4 * 4096 + 2 * 11008 + 4096) + 2 * 32000)  # a bf16 scale per row, embeddings too
    assert w8 - classic_w8 == 65 * 4096 + scales  # norms stay bf16: +3.1 MB, +0.05%
    embed_and_norms = 2 * 32000 * 4096 + 65 * 4096
    float_embeddings = weight_bytes(llama, "w8", -1, quantize_embeddings=False)
    assert float_embeddings - w8 == embed_and_norms - 65 * 4096 - 2 * 2 * 32000  # +0.26 GB kept in bf16
    states = optimizer_state_bytes([p.shape for p in model_params(llama)], "adamw", 4)
    assert states == 8 * n + 4 * (32 * 9 + 3)  # 8 bytes per parameter + a step per tensor


def test_zero_paper_7_5b_over_64_devices():
    """ZeRO paper, Figure 1: 7.5 B parameters, mixed-precision Adam (2 + 2 + 12 bytes per parameter, K=12),
    64 devices: 120 / 31.4 / 16.6 / 1.9 GB per device for stages 0 / 1 / 2 / 3."""
    psi = 7_500_000_000
    states = ModelStates(
        weights=2 * psi, master=4 * psi, gradients=2 * psi, optimizer=optimizer_state_bytes([(psi,)], "adamw", 4) - 4,
        trainable_shapes=[(psi,)], head_gradients=0, layer_gradients=0, embedding_gradients=0, largest_layer_weights=0,
    )  # fmt: skip
    published = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in published.items():
        per_device = shard(states, TrainingSettings(zero_stage=stage, num_devices=64))
        assert round(sum(per_device.values()) / GB, 1) == gb


def test_plan_training_uses_the_same_sharding_on_a_real_model():
    llama = resolve_model("llama-2-7b").config
    n = llama.num_parameters()
    for stage, expected in {
        0: 16 * n,
        1: 4 * n + 12 * n / 64,
        2: 2 * n + 14 * n / 64,
        3: 16 * n / 64,
    }.items():
        plan = plan_training(llama, BIG, TrainingSettings(zero_stage=stage, num_devices=64, seq_len=512))
        got = sum(plan.model_states.values())
        assert abs(got - expected) / expected < 1e-6, stage  # step counters are the only difference


def test_lora_and_qlora_states():
    llama = resolve_model("llama-2-7b").config
    s = TrainingSettings(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"), precision="bf16")
    st = model_states(llama, s)
    trainable = 32 * 2 * 8 * (4096 + 4096)  # A [8, 4096] and B [4096, 8] on q and v of 32 layers
    assert (
        sum(a * b for a, b in st.trainable_shapes) == trainable == 4_194_304
    )  # peft's figure for this setup
    assert st.gradients == 2 * trainable and st.optimizer == 4 * trainable + 4 * 128
    assert st.weights == 2 * llama.num_parameters() + 2 * trainable
    q = model_states(
        llama, TrainingSettings(method="qlora", lora_rank=8, qlora_group_size=64, precision="bf16")
    )
    proj = 32 * (4 * 4096 * 4096 + 3 * 11008 * 4096)
    assert q.weights < 0.35 * st.weights
    assert (
        q.weights - 2 * sum(a * b for a, b in q.trainable_shapes)
        == proj // 2 + proj // 64 * 4 + (2 * 32000 * 4096 + 65 * 4096) * 2
    )


def test_low_bit_optimizer_states_equal_slimlm_optim():
    optim = pytest.importorskip("slimlm.optim.variants")
    memory = pytest.importorskip("slimlm.optim.memory")
    shapes = [(300, 70), (4096,), (5000,), (3, 40, 50), (64,), (2, 2049)]
    for name, cls in {
        "adamw8bit": optim.AdamW8bit,
        "adamw4bit": optim.AdamW4bit,
        "adamw4bit-factor": optim.AdamWFactor4bit,
    }.items():
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = cls(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert memory.optimizer_state_bytes(opt) == optimizer_state_bytes(shapes, name), name
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in shapes]
    for cls, name in ((torch.optim.AdamW, "adamw"), (torch.optim.SGD, "sgd")):
        opt = cls(params, lr=1e-3, momentum=0.9) if name == "sgd" else cls(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        real = sum(t.untyped_storage().nbytes() for st in opt.state.values() for t in st.values())
        assert real == sum(tensor_state_bytes(s, name, state_bytes=2) for s in shapes), name


def test_classic_savings_show_in_the_plan():
    cfg = resolve_model("llama-3-8b").config
    full = plan_training(cfg, BIG, TrainingSettings(seq_len=1024))
    ckpt = plan_training(cfg, BIG, TrainingSettings(seq_len=1024, gradient_checkpointing=True))
    eager = plan_training(cfg, BIG, TrainingSettings(seq_len=1024, flash_attention=False))

    def part(plan, name):
        return next(c.bytes for c in plan.components if c.name == name)

    assert (
        ckpt.activation_bytes < full.activation_bytes / 5 and eager.activation_bytes > full.activation_bytes
    )
    assert full.logits_bytes == 12 * 128256 * 1024  # fp32 log-softmax and its gradients over the vocabulary
    chunked = plan_training(cfg, BIG, TrainingSettings(seq_len=1024, micro_batch=4, loss_chunk_tokens=256))
    assert chunked.logits_bytes == 12 * 128256 * 256  # one chunk of the 4096 tokens at a time
    eight = plan_training(cfg, BIG, TrainingSettings(seq_len=1024, optimizer="adamw8bit"))
    # 1 byte per state plus an fp32 absmax per 256 elements, against 4 bytes per state
    assert part(eight, "optimizer_states") / part(full, "optimizer_states") == pytest.approx(
        (1 + 4 / 256) / 4, rel=1e-3
    )
    offload = plan_training(cfg, BIG, TrainingSettings(seq_len=1024, offload_optimizer=True))
    assert offload.total_bytes < full.total_bytes
    assert offload.host_bytes >= part(full, "optimizer_states") + part(full, "master_weights")


def test_training_verdict_and_suggestions():
    cfg = resolve_model("llama-3-8b").config
    gpu = Device("24GB", 24 * GB, 24 * GB, "gpu", 512 * 2**20)
    plan = plan_training(cfg, gpu, TrainingSettings(micro_batch=4, seq_len=4096))
    assert not plan.fits
    fixes = suggest_training(plan)
    assert fixes and all(f["total_bytes"] <= gpu.usable_bytes for f in fixes)
    assert any("qlora" in f["change"] for f in fixes)
    small = plan_training(
        resolve_model("qwen2.5-0.5b").config, gpu, TrainingSettings(method="lora", seq_len=512)
    )
    assert small.fits and suggest_training(small) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"micro_batch": -1}, "micro batch must be a positive integer"),
        ({"seq_len": 0}, "seq len must be a positive integer"),
        ({"zero_stage": 4}, "ZeRO stage must be 0, 1, 2 or 3"),
        ({"loss_chunk_tokens": 0}, "loss chunk must be a positive"),
        ({"num_devices": 0}, "num devices must be"),
        ({"method": "dora"}, "unknown training method"),
        ({"precision": "fp8"}, "unknown precision"),
        ({"optimizer": "adafactor"}, "unknown optimizer"),
        ({"method": "lora", "lora_rank": 0}, "LoRA rank"),
        ({"method": "lora", "lora_targets": ("qkv",)}, "unknown LoRA target"),
    ],
)
def test_bad_training_settings(kwargs, message):
    with pytest.raises(SlimlmError, match=message):
        TrainingSettings(**kwargs)


def test_foreach_adamw_holds_a_sqrt_of_every_state():
    """torch's multi-tensor AdamW (its default on GPUs) computes sqrt(v) for the whole parameter list at
    once; the for-loop step holds two tensors of the largest parameter."""
    cfg = resolve_model("qwen2.5-0.5b").config
    n = cfg.num_parameters()
    largest = cfg.vocab_size * cfg.hidden_size
    gpu = Device("gpu", 10**15, 10**15, "gpu", 0)
    settings = dict(precision="fp32", seq_len=16)
    multi = plan_training(cfg, gpu, TrainingSettings(**settings))
    loop = plan_training(cfg, gpu, TrainingSettings(**settings, foreach=False))
    assert multi.phases["optimizer_step"] - loop.phases["optimizer_step"] == 4 * n - 2 * 4 * largest
