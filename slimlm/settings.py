"""Command-line flags generated from the settings dataclasses (EngineConfig, SamplingParams, TrainConfig,
the planner's settings), so a field's default, type, help and flag names are written once, in the dataclass.

A field declares its flag with `arg(default, help=..., names=..., aliases=...)` (metadata, as mlx-lm and
torchtune keep it); `add_fields` adds the flags to a parser or group, `from_args` builds the dataclass from
the parsed namespace. The flag's dest is always the field's name. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Iterable
from typing import Any

_KEY = "slimlm.flag"


def arg(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, help: str | None = None,
        names: tuple[str, ...] = (), aliases: tuple[str, ...] = (), **argparse_kwargs: Any) -> Any:  # fmt: skip
    """A dataclass field with its command-line flag.

    `names`: the flag's spellings (default `--field-name`); `aliases`: old spellings, still accepted with a
    one-line note on stderr; `argparse_kwargs`: type, choices, action, nargs, const, metavar, and
    `cli_default` where the flag's default must differ from the field's (None: "leave it to the field").
    """
    meta = {"help": help, "names": tuple(names), "aliases": tuple(aliases), **argparse_kwargs}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: meta})


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The field's annotation as a type (`int | None` -> int); None where it is not a plain scalar."""
    hint = f.type
    if isinstance(hint, str):
        try:
            hint = eval(hint, vars(sys.modules[cls.__module__]))  # noqa: S307 - the class's own annotation
        except Exception:
            return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (int, float, str, bool) else None


def field_default(cls: type, name: str) -> Any:
    """The default of `cls`'s field `name` (a fresh value for a default_factory field)."""
    value = _default(cls.__dataclass_fields__[name])
    if value is dataclasses.MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


class _AliasNote(argparse.Action):
    """Mixed into the flag's action: an old spelling still works and says once which one replaces it."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D401 - argparse's hook
        if option_string in self._aliases:
            print(f"note: {option_string} is deprecated; use {self.option_strings[0]}", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def add_fields(parser: argparse._ActionsContainer, cls: type, names: Iterable[str] | None = None,
               **defaults: Any) -> None:  # fmt: skip
    """Add the flags of `cls`'s fields `names` (default: every field that declares one) to `parser`.

    `defaults`: field name -> a different flag default for this command (its reason stays at the call)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names if names is not None else [n for n, f in fields.items() if _KEY in f.metadata]:
        f = fields[name]
        meta = dict(f.metadata.get(_KEY, {}))
        kwargs: dict[str, Any] = {"dest": name, "help": meta.pop("help", None)}
        spellings = meta.pop("names", ()) or ("--" + name.replace("_", "-"),)
        aliases = meta.pop("aliases", ())
        default = meta.pop("cli_default", _default(f))
        default = defaults.get(name, default)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        kwargs.update(meta)
        if "action" not in kwargs and "type" not in kwargs and "nargs" not in kwargs:
            hint = _field_type(cls, f)
            if hint is bool:
                kwargs["action"] = "store_true"
            elif hint is not None and hint is not str:
                kwargs["type"] = hint
        if aliases:
            base = parser._registry_get("action", kwargs.get("action", "store"), kwargs.get("action"))
            kwargs["action"] = type("AliasNote", (_AliasNote, base), {"_aliases": aliases})
        parser.add_argument(*spellings, *aliases, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """`cls` from the parsed flags named like its fields; a None flag leaves the field's default."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and not (getattr(args, f.name) is None and _default(f) is not None):
            values[f.name] = getattr(args, f.name)
    values.update(overrides)
    return cls(**values)


__all__ = ["add_fields", "arg", "field_default", "from_args"]
