"""`slimlm generate "prompt" [...]`: one-shot or batch generation from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from slimlm.commands.common import (
    add_engine_args,
    add_model_args,
    add_sampling_args,
    llm_from_args,
    sampling_params_from_args,
)
from slimlm.commands.structured_args import add_structured_args, structured_from_args
from slimlm.errors import SlimlmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompt text(s); several are generated together")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or memory report")
    add_model_args(p)
    add_engine_args(p)
    add_sampling_args(p)
    add_structured_args(p)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise SlimlmError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
    if not prompts and not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        prompts = [text] if text else []
    if not prompts:
        raise SlimlmError('no prompt given; pass one, e.g. slimlm generate "Tell me a joke" --chat')
    return prompts


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)  # validate flags before loading anything
    structure = structured_from_args(args)
    if structure is not None:
        params = dataclasses.replace(params, structured_outputs=structure)
    prompts = _read_prompts(args)
    if args.system and not args.chat:
        raise SlimlmError("--system needs --chat")
    single = len(prompts) == 1 and params.num_beams == 1  # beams decode several rows a step
    llm = llm_from_args(args, progress=not args.quiet, single_stream=single)
    if not args.quiet:
        print(llm.memory_report_text(), file=sys.stderr)
    if args.chat:
        messages = [
            ([{"role": "system", "content": args.system}] if args.system else [])
            + [{"role": "user", "content": p}]
            for p in prompts
        ]
        inputs = [llm.chat_prompt(m) for m in messages]
    else:
        inputs = prompts
    if len(inputs) == 1 and params.num_beams == 1 and not args.json:
        for out in llm.stream(inputs[0], params):  # stream a single prompt as it is generated
            sys.stdout.write(out.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for prompt, result in zip(prompts, llm.generate(inputs, params), strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": result.text,
                        "finish_reason": result.finish_reason,
                        "completion_tokens": len(result.token_ids),
                    }
                )
            )
        else:
            print(f"### {prompt}\n{result.text}\n")
    return 0
