"""`slimlm` command line: parse, call the library, print. Every user mistake ends as one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import sys

from slimlm.errors import SlimlmError

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "plan": ("slimlm.commands.plan", "will it fit? memory plan for inference and training"),
    "generate": ("slimlm.commands.generate", "generate text for one or more prompts"),
    "chat": ("slimlm.commands.chat", "interactive streaming chat"),
    "bench": ("slimlm.commands.bench", "speed and memory against transformers and llama.cpp"),
    "quantize": ("slimlm.commands.quantize", "quantize weights (RTN / AWQ / GPTQ, int8 / int4)"),
    "eval": ("slimlm.commands.evaluate", "perplexity and side-by-side comparison of variants"),
    "serve": ("slimlm.commands.serve", "OpenAI-compatible HTTP server with a web chat page"),
    "train": ("slimlm.commands.train", "LoRA / QLoRA / full fine-tuning"),
    "merge": ("slimlm.commands.merge", "merge a LoRA adapter into a full checkpoint"),
    "guard": ("slimlm.commands.guard", "approved-reply libraries for serve --guard: build, test, calibrate"),
}


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage (25 lines for `generate`) before a mistake; ours is one line,
    like every other slimlm error, and points at --help for the usage."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


def _module(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    if name == "plan":  # the planner exposes its own names
        return module.add_plan_arguments, module.run_plan
    return module.add_arguments, module.run


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="slimlm", description="Run and fine-tune LLMs inside the memory you have.")
    from slimlm import __version__

    parser.add_argument("--version", action="version", version=f"slimlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}  # name -> its parser, so a stray flag is reported with that command's --help
    for name, (_module_name, help_text) in COMMANDS.items():
        p = parser.commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            try:
                add_arguments, _ = _module(name)
            except ModuleNotFoundError:
                continue  # a part that is not built yet
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        where = parser.commands.get(args.command, parser)
        where.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _, run = _module(args.command)
        return int(run(args) or 0)
    except SlimlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        print(
            f"error: a dependency is missing ({e.name}); install slimlm with its extras, e.g. pip install 'slimlm[serve]'",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # never show users a traceback; say how to get one
        import os

        if os.environ.get("SLIMLM_DEBUG"):
            raise
        print(
            f"error: internal error ({type(e).__name__}: {e}); rerun with SLIMLM_DEBUG=1 for a traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
