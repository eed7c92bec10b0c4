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


# Defaults that differ on purpose, with the reason.
DELIBERATE = {
    # The CLI decodes greedily unless asked; the library and the server keep OpenAI's temperature 1.0.
    ("generate", "temperature"),
    ("chat", "temperature"),
}

# command -> the dataclasses its flags feed (fields matched by dest name)
FEEDS = {
    "generate": (SamplingParams, EngineConfig),
    "chat": (SamplingParams, EngineConfig),
    "serve": (EngineConfig,),
    "bench": (EngineConfig,),
    "plan": (EngineConfig,),
    "train": ("TrainConfig",),
}


@pytest.mark.parametrize("command", sorted(FEEDS))
def test_cli_defaults_are_the_dataclass_defaults(command):
    assert command in COMMANDS
    defaults: dict[str, object] = {}
    for cls in FEEDS[command]:
        defaults.update(_field_defaults(_train_config() if cls == "TrainConfig" else cls))
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
