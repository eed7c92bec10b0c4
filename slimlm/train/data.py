"""Training data: read conversations or text, apply the chat template, mask the loss to assistant tokens.

Formats (one record per JSONL line, or a JSON array / object of records):

- XTuner:  {"conversation": [{"system": "...", "input": "...", "output": "..."}, ...]}  (system optional)
- OpenAI:  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
           (an assistant message with "weight": 0 is shown to the model but not learned)
- text:    {"text": "..."}, or any other file (.txt, .md, ...) read as one plain-text document.

Chat records become token ids plus labels: labels equal the ids on assistant replies (the reply and the
template's end-of-turn tokens) and -100 everywhere else, so the loss sees only what the model should say.
Every error names the file and line of the bad record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError

IGNORE_INDEX = -100
JSON_SUFFIXES = (".json", ".jsonl")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training sequence: ids and labels of equal length (labels -100 where there is no loss)."""

    input_ids: list[int]
    labels: list[int]
    where: str  # "file:line" of the record it came from

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        # position 0 has no previous token to predict it from
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class Record:
    """A parsed record: a chat (messages, each with a `train` flag) or a plain text."""

    where: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None


# -- reading ----------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> Iterator[Record]:
    """Parse every record of a data file; raises SlimlmError naming file and line on the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SlimlmError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path, text)
    elif suffix == ".json":
        yield from _json_records(path, text)
    else:
        if text.strip():
            yield Record(f"{path}:1", text=text)


def _jsonl_records(path: Path, text: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimlmError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield parse_record(obj, where)


def _json_records(path: Path, text: str) -> Iterator[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        yield parse_record(data, f"{path}:1")
        return
    if not isinstance(data, list):
        raise SlimlmError(f"{path}:1: expected a JSON array of records or one record object")
    lines = _array_item_lines(text)
    for index, obj in enumerate(data):
        line = lines[index] if index < len(lines) else 1
        yield parse_record(obj, f"{path}:{line}")


def _array_item_lines(text: str) -> list[int]:
    """The line on which each item of a top-level JSON array starts (for error messages)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    lines = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


def parse_record(obj: Any, where: str) -> Record:
    """One JSON record in the XTuner, OpenAI or text format -> Record."""
    if not isinstance(obj, dict):
        raise SlimlmError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "conversation" in obj:
        return Record(where, messages=_xtuner_messages(obj["conversation"], where))
    if "messages" in obj:
        return Record(where, messages=_openai_messages(obj["messages"], where))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise SlimlmError(f"{where}: 'text' must be a non-empty string")
        return Record(where, text=obj["text"])
    keys = ", ".join(sorted(obj)[:5]) or "none"
    raise SlimlmError(
        f"{where}: unknown record format (keys: {keys}); expected 'conversation' (XTuner), "
        "'messages' (OpenAI) or 'text'"
    )


def _xtuner_messages(turns: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise SlimlmError(f"{where}: 'conversation' must be a non-empty list of turns")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SlimlmError(f"{where}: conversation turn {j} must be an object with 'input' and 'output'")
        for key in ("input", "output"):
            if not isinstance(turn.get(key), str):
                raise SlimlmError(f"{where}: conversation turn {j} needs a string '{key}'")
        if turn.get("system"):
            if not isinstance(turn["system"], str):
                raise SlimlmError(f"{where}: conversation turn {j}: 'system' must be a string")
            messages.append({"role": "system", "content": turn["system"], "train": False})
        messages.append({"role": "user", "content": turn["input"], "train": False})
        messages.append({"role": "assistant", "content": turn["output"], "train": True})
    return messages


def _openai_messages(raw: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise SlimlmError(f"{where}: 'messages' must be a non-empty list")
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise SlimlmError(f"{where}: message {j} needs a 'role' of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(p for p in parts if isinstance(p, str)) if parts else None
        if not isinstance(content, str):
            raise SlimlmError(f"{where}: message {j} ({m['role']}) needs string 'content'")
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            raise SlimlmError(f"{where}: message {j}: 'weight' must be 0 or 1, got {weight!r}")
        train = m["role"] == "assistant" and weight == 1
        messages.append({"role": m["role"], "content": content, "train": train})
    if not any(m["role"] == "assistant" for m in messages):
        raise SlimlmError(f"{where}: the conversation has no assistant message to learn from")
    return messages


# -- tokenizing -------------------------------------------------------------------------------------------


def tokenize_record(tokenizer, record: Record) -> Example:
    """Token ids and loss labels of one record (no truncation here)."""
    if record.text is not None:
        ids = tokenizer.encode(record.text, add_special_tokens=True)
        eos = tokenizer.eos_token_ids
        ids = ids + eos[:1]  # the document ends: lets packed documents be told apart
        return Example(ids, list(ids), record.where)
    return tokenize_chat(tokenizer, record.messages, record.where)


def tokenize_chat(tokenizer, messages: list[dict[str, Any]], where: str) -> Example:
    """Render with the chat template; labels cover each assistant reply up to its end-of-turn tokens.

    A reply's span starts where the template's generation prompt for it ends and ends where the
    conversation rendered up to and including the reply ends; the template must only append.
    """
    if messages[0]["role"] == "assistant":
        raise SlimlmError(
            f"{where}: the conversation starts with an assistant message; add the user turn before it"
        )
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, chat, False, where)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, chat[:i], True, where)
        end = _render(tokenizer, chat[: i + 1], False, where)
        if not (full.startswith(end) and end.startswith(start) and len(start) >= done):
            raise SlimlmError(
                f"{where}: the model's chat template rewrites earlier turns, so assistant replies cannot be "
                "located for the loss mask; train on plain text or use another template"
            )
        pieces += [(full[done : len(start)], False), (full[len(start) : len(end)], message["train"])]
        done = len(end)
    pieces.append((full[done:], False))
    ids: list[int] = []
    labels: list[int] = []
    for text, train in pieces:
        if not text:
            continue
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if train else [IGNORE_INDEX] * len(piece)
    return Example(ids, labels, where)


def _render(tokenizer, chat: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
    except SlimlmError as e:
        raise SlimlmError(f"{where}: {e}") from None


def load_examples(
    tokenizer, paths: list[str | Path], max_seq_len: int
) -> tuple[list[Example], dict[str, int]]:
    """Read, tokenize and fit every record to `max_seq_len`.

    Plain text longer than `max_seq_len` is cut into consecutive windows; chats are truncated at the end.
    Examples left with no loss token are dropped. Returns (examples, counts of what happened).
    """
    if max_seq_len < 2:
        raise SlimlmError(f"max sequence length must be at least 2, got {max_seq_len}")
    examples: list[Example] = []
    stats = {"records": 0, "truncated": 0, "dropped": 0, "windows": 0}
    for path in paths:
        for record in read_records(path):
            stats["records"] += 1
            example = tokenize_record(tokenizer, record)
            if record.text is not None and len(example) > max_seq_len:
                windows = _windows(example, max_seq_len)
                stats["windows"] += len(windows) - 1
            else:
                windows = [example]
                if len(example) > max_seq_len:
                    stats["truncated"] += 1
                    windows = [
                        Example(example.input_ids[:max_seq_len], example.labels[:max_seq_len], example.where)
                    ]
            for window in windows:
                if window.num_loss_tokens == 0:
                    stats["dropped"] += 1
                else:
                    examples.append(window)
    if not examples:
        raise SlimlmError(
            f"no usable training example in {', '.join(map(str, paths))} "
            f"({stats['records']} record(s), {stats['dropped']} without a loss token after truncation to "
            f"{max_seq_len} tokens)"
        )
    return examples, stats


def _windows(example: Example, size: int) -> list[Example]:
    return [
        Example(example.input_ids[i : i + size], example.labels[i : i + size], example.where)
        for i in range(0, len(example), size)
    ]


__all__ = [
    "IGNORE_INDEX",
    "Example",
    "Record",
    "load_examples",
    "parse_record",
    "read_records",
    "tokenize_chat",
]
