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
    read_text_file,
    require_text,
    sampling_params_from_args,
)
from slimlm.commands.logprobs_output import logprob_records, logprob_table
from slimlm.commands.structured_args import add_structured_args, structured_from_args
from slimlm.engine.beam import check_num_beams
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
    prompts = [require_text(p, f"prompt {i + 1}") for i, p in enumerate(args.prompts)]
    if args.prompts_file:
        text = read_text_file(args.prompts_file, "--prompts-file")
        prompts += [line for line in text.split("\n") if line.strip()]
    if not prompts and not sys.stdin.isatty():
        text = require_text(sys.stdin.read(), "standard input").strip()
        prompts = [text] if text else []
    if not prompts:
        raise SlimlmError('no prompt given; pass one, e.g. slimlm generate "Tell me a joke" --chat')
    if args.system:
        require_text(args.system, "--system")
    return prompts


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)  # validate flags before loading anything
    check_num_beams(params.num_beams)
    structure = structured_from_args(args)
    if structure is not None:
        params = dataclasses.replace(params, structured_outputs=structure)
    prompts = _read_prompts(args)
    if args.system and not args.chat:
        raise SlimlmError("--system needs --chat")
    if params.logprobs is not None and params.num_beams > 1:
        raise SlimlmError("--logprobs is not reported for beam search; drop --logprobs or --num-beams")
    # No more sequences than prompts run at once: the default pool is sized for that (docs/kv_cache.md).
    if args.max_num_seqs > 0:  # (a bad value is left for the engine's own error)
        args.max_num_seqs = min(args.max_num_seqs, len(prompts) * params.num_beams)
    single = len(prompts) == 1 and params.num_beams == 1  # beams decode several rows a step
    llm = llm_from_args(args, progress=not args.quiet, single_stream=single)
    llm.show_progress = not args.quiet  # beam search shows its steps
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
        entries = []
        for out in llm.stream(inputs[0], params):  # stream a single prompt as it is generated
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.logprob is not None:
                entries.append(out.logprob)
        sys.stdout.write("\n")
        if params.logprobs is not None:
            print(f"--- logprobs\n{logprob_table(logprob_records(llm.tokenizer, entries))}")
        return 0
    for prompt, result in zip(prompts, llm.generate(inputs, params), strict=True):
        records = logprob_records(llm.tokenizer, result.logprobs) if params.logprobs is not None else None
        if args.json:
            record = {
                "prompt": prompt,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "completion_tokens": len(result.token_ids),
            }
            if records is not None:
                record["logprobs"] = records
            print(json.dumps(record))
        else:
            print(f"### {prompt}\n{result.text}\n")
            if records is not None:
                print(f"--- logprobs\n{logprob_table(records)}\n")
    return 0
