"""Flag defaults read from the settings dataclasses, so that each default is written once (in the dataclass)
and the CLI cannot drift from the library (tests/test_cli_defaults.py checks every command)."""

from __future__ import annotations

import dataclasses


def field_default(cls: type, name: str):
    """The default of dataclass field `name` of `cls` (a fresh value for a default_factory field)."""
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")
