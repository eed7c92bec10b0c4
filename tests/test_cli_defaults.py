"""A default is written once: every CLI flag that feeds a settings dataclass field of the same name has the
field's default (or None, meaning "leave it to the dataclass"). Reads the real parsers `slimlm.cli` builds."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from slimlm.cli import COMMANDS, build_parser
from slimlm.engine.config import EngineConfig
from slimlm.engine.params import SamplingParams


def _field_defaults(cls) -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError(f"no subcommand {command}")


def _train_config():
    return pytest.importorskip("slimlm.train.config").TrainConfig


def _resolve(cls):
    if cls == "TrainConfig":
        return _train_config()
    if cls == "TrainingSettings":
        from slimlm.plan.training import TrainingSettings

        return TrainingSettings
    return cls


# Defaults that differ on purpose, with the reason.
DELIBERATE = {
    # The CLI decodes greedily unless asked; the library and the server keep OpenAI's temperature 1.0.
    ("generate", "temperature"),
    ("chat", "temperature"),
    # The planner plans what `slimlm train` would do: its LoRA dropout is the trainer's (checked below).
    ("plan", "lora_dropout"),
}

# command -> the dataclasses its flags feed (fields matched by dest name)
FEEDS = {
    "generate": (SamplingParams, EngineConfig),
    "chat": (SamplingParams, EngineConfig),
    "serve": (EngineConfig,),
    "bench": (EngineConfig,),
    "plan": (EngineConfig, "TrainingSettings"),
    "train": ("TrainConfig",),
}


@pytest.mark.parametrize("command", sorted(FEEDS))
def test_cli_defaults_are_the_dataclass_defaults(command):
    assert command in COMMANDS
    defaults: dict[str, object] = {}
    for cls in FEEDS[command]:
        defaults.update(_field_defaults(_resolve(cls)))
    sub = _subparser(command)
    compared, differ = 0, []
    for action in sub._actions:
        if action.dest not in defaults or action.default is None or action.default is argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue  # a switch: its default is "not given", the field says what that means
        compared += 1
        if (command, action.dest) in DELIBERATE:
            assert action.default != defaults[action.dest], (
                f"{command} {action.dest}: drop it from DELIBERATE"
            )
            continue
        if action.default != defaults[action.dest]:
            differ.append(
                f"{action.option_strings[0]}: CLI {action.default!r}, dataclass {defaults[action.dest]!r}"
            )
    assert differ == [], f"slimlm {command}: defaults written twice and different"
    assert compared > 0, f"slimlm {command}: no flag matched a dataclass field (is FEEDS right?)"


def test_plan_training_flags_are_the_trainers():
    """`slimlm plan --mode training` spells the knobs as `slimlm train` does; the old spellings still parse."""
    TrainConfig = _train_config()
    plan, train = _subparser("plan"), _subparser("train")
    train_flags = {s for a in train._actions for s in a.option_strings}
    for flag in ("--optim", "--batch-size", "--max-seq-len", "--grad-accum", "--lora-rank", "--lora-dropout",
                 "--method", "--precision", "--gradient-checkpointing", "--offload-optimizer"):  # fmt: skip
        assert flag in train_flags
        assert any(flag in a.option_strings for a in plan._actions), flag
    dropout = next(a for a in plan._actions if a.dest == "lora_dropout")
    assert dropout.default == _field_defaults(TrainConfig)["lora_dropout"]
    new = plan.parse_args(["--optim", "factor4bit", "--batch-size", "3", "--max-seq-len", "64"])
    old = plan.parse_args(["--optimizer", "adamw4bit-factor", "--micro-batch", "3", "--seq-len", "64"])
    for ns in (new, old):
        assert (ns.micro_batch, ns.seq_len) == (3, 64)
    from slimlm.plan.training import TrainingSettings
    from slimlm.settings import from_args

    assert from_args(TrainingSettings, new) == from_args(TrainingSettings, old)
