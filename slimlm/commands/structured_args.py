"""`--json-schema FILE | --json-object | --regex R | --choice A B C | --grammar FILE` for `slimlm generate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimlm.engine.structured import StructuredOutputs
from slimlm.errors import SlimlmError


def add_structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (needs slimlm[structured]; docs/structured.md)")
    one = g.add_mutually_exclusive_group()
    one.add_argument(
        "--json-schema", metavar="FILE", help="the output is JSON valid against this schema file"
    )
    one.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    one.add_argument("--regex", metavar="R", help="the whole output matches this regex")
    one.add_argument("--choice", nargs="+", metavar="TEXT", help="the output is one of these strings")
    one.add_argument("--grammar", metavar="FILE", help="the output follows this Lark or GBNF grammar file")


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SlimlmError(f"cannot read {flag} {path}: {e.strerror}") from None


def structured_from_args(args: argparse.Namespace) -> StructuredOutputs | None:
    if args.json_schema:
        return StructuredOutputs(json=_read("--json-schema", args.json_schema))
    if args.json_object:
        return StructuredOutputs(json_object=True)
    if args.regex:
        return StructuredOutputs(regex=args.regex)
    if args.choice:
        return StructuredOutputs(choice=args.choice)
    if args.grammar:
        return StructuredOutputs(grammar=_read("--grammar", args.grammar))
    return None
