"""Bad input to the low-bit optimizers: one clear SlimlmError each."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.optim import AdamW4bit, AdamW8bit, AdamWFactor4bit


def param(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("option", ["amsgrad", "fused", "capturable", "differentiable"])
def test_unsupported_torch_options_are_refused(option):
    with pytest.raises(SlimlmError, match=f"does not support {option}=True"):
        AdamW4bit([param(4)], **{option: True})


def test_torch_only_speed_hints_and_defaults_are_accepted():
    opt = AdamW8bit(
        [param(4)], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, foreach=True
    )
    assert opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_unsupported_parameter_dtypes(dtype):
    with pytest.raises(SlimlmError, match="supports parameters of dtype float32, bfloat16, float16"):
        AdamW4bit([param(8, 8, dtype=dtype)])


def test_integer_tensors_and_non_tensors_are_refused():
    with pytest.raises(SlimlmError, match="dtype"):
        AdamW4bit([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(SlimlmError, match="optimizes tensors"):
        AdamW4bit([3.0])
    opt = AdamW4bit([param(4)])
    with pytest.raises(SlimlmError, match="dtype"):
        opt.add_param_group({"params": [param(4, dtype=torch.float64)]})


def test_empty_parameter_list():
    with pytest.raises(SlimlmError, match="empty parameter list"):
        AdamWFactor4bit([])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "pair"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"block_size": 127}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"fp32_state_max_numel": -1}, "fp32_state_max_numel"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(SlimlmError, match=match):
        AdamW4bit([param(4)], **kwargs)
    opt = AdamW4bit([param(4)])
    if "lr" in kwargs or "betas" in kwargs:
        with pytest.raises(SlimlmError, match=match):
            opt.add_param_group({"params": [param(4)], **kwargs})


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(SlimlmError, match="sparse gradients"):
        opt.step()


def trained(cls, params, **kwargs):
    opt = cls(params, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_loading_a_state_from_another_optimizer_or_layout_is_refused():
    shapes = [(64, 128), (10,)]
    saved = trained(AdamW4bit, [param(*s) for s in shapes]).state_dict()
    with pytest.raises(SlimlmError, match="not saved by slimlm"):
        AdamW4bit([param(*s) for s in shapes]).load_state_dict(
            trained(torch.optim.AdamW, [param(*s) for s in shapes]).state_dict()
        )
    with pytest.raises(SlimlmError, match="construct a matching optimizer"):
        AdamW8bit([param(*s) for s in shapes]).load_state_dict(saved)
    with pytest.raises(SlimlmError, match="construct a matching optimizer"):
        AdamW4bit([param(*s) for s in shapes], block_size=64).load_state_dict(saved)
    with pytest.raises(SlimlmError, match="does not fit"):
        AdamW4bit([param(128, 64), param(10)]).load_state_dict(saved)
    with pytest.raises(SlimlmError, match="other parameter groups"):
        AdamW4bit([param(64, 128)]).load_state_dict(saved)
    future = {**saved, "slimlm_optimizer": {**saved["slimlm_optimizer"], "format_version": 99}}
    with pytest.raises(SlimlmError, match="format 99"):
        AdamW4bit([param(*s) for s in shapes]).load_state_dict(future)
