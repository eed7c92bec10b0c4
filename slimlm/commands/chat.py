"""`slimlm chat`: interactive streaming multi-turn chat. The history's KV is reused via the prefix cache."""

from __future__ import annotations

import argparse
import sys
import time

from slimlm.commands.common import (
    add_engine_args,
    add_model_args,
    add_sampling_args,
    llm_from_args,
    require_text,
    sampling_params_from_args,
)
from slimlm.errors import SlimlmError

HELP = "commands: /reset (new conversation), /system TEXT (set system prompt and reset), /exit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--stats", action="store_true", help="after each reply print prefill/cached tokens and speed"
    )
    add_model_args(p)
    add_engine_args(p)
    add_sampling_args(p)


class ChatSession:
    """The conversation state; each turn renders the whole history and lets the prefix cache skip it."""

    def __init__(self, llm, params, system: str | None) -> None:
        self.llm, self.params, self.system = llm, params, system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str):
        """Yields text pieces of the assistant's reply; records it in the history when done."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            prompt = self.llm.chat_prompt(self.messages)
            stats = self.llm.engine.stats
            computed_before = stats.computed_prompt_tokens
            pieces = []
            start = time.perf_counter()
            for out in self.llm.stream(prompt, self.params):
                pieces.append(out.text)
                yield out.text
        except BaseException:  # a failed or stopped turn leaves the history as it was before it
            self.messages.pop()
            raise
        elapsed = time.perf_counter() - start
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.last_turn = {
            "prompt_tokens": len(prompt),
            "prefill_tokens": stats.computed_prompt_tokens - computed_before,
            "seconds": elapsed,
        }


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    if args.system:
        require_text(args.system, "--system")
    args.max_num_seqs = 1  # one conversation: the default pool holds one full-length sequence
    llm = llm_from_args(args, single_stream=True)  # one conversation: one sequence at a time
    print(llm.memory_report_text(), file=sys.stderr)
    session = ChatSession(llm, params, args.system)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        try:
            require_text(text, "this line")
        except SlimlmError as e:  # binary input: say so and keep the conversation
            print(f"error: {e}", file=sys.stderr)
            continue
        if text.startswith("/system"):
            session.system = text[len("/system") :].strip() or None
            session.reset()
            print("(system prompt set; new conversation)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
            continue
        try:
            for piece in session.reply(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except SlimlmError as e:  # e.g. the history outgrew the KV pool: the conversation stays usable
            sys.stdout.write("\n")
            print(f"error: {e}; the turn was dropped (/reset starts a new conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply; Ctrl-C at the prompt (or /exit) quits
            sys.stdout.write("\n")
            print("(reply stopped; the turn was dropped)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if args.stats:
            t = session.last_turn
            print(
                f"[prompt {t['prompt_tokens']} tokens, prefilled {t['prefill_tokens']}, {t['seconds']:.2f}s]",
                file=sys.stderr,
            )
