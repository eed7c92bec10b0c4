"""The approved-replies JSONL file: one reply per line, validated with a line number on every mistake.

{"id": "returns-window", "text": "You can return ...", "stage": "after_sale", "tags": ["returns"],
 "examples": ["model answers that should map to this reply", ...]}
`id` and `text` are required; the text and every example are embedded and indexed (each example is
one more row pointing at its reply), so known phrasings of an answer snap to the right reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError

_FIELDS = {"id", "text", "stage", "tags", "examples"}


@dataclass
class Reply:
    id: str
    text: str
    stage: str | None = None
    tags: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out: dict = {"id": self.id, "text": self.text}
        if self.stage is not None:
            out["stage"] = self.stage
        if self.tags:
            out["tags"] = self.tags
        if self.examples:
            out["examples"] = self.examples
        return out


def _strings(value, where: str, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SlimlmError(f"{where}: '{name}' must be a list of non-empty strings")
    return list(value)


def parse_reply(obj, where: str) -> Reply:
    if not isinstance(obj, dict):
        raise SlimlmError(f"{where}: each line must be a JSON object with 'id' and 'text'")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise SlimlmError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: id, text, stage, tags, examples"
        )
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid.strip():
        raise SlimlmError(f"{where}: 'id' must be a non-empty string")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise SlimlmError(f"{where}: 'text' must be a non-empty string (reply {rid!r})")
    stage = obj.get("stage")
    if stage is not None and (not isinstance(stage, str) or not stage):
        raise SlimlmError(f"{where}: 'stage' must be a non-empty string when given")
    tags = _strings(obj["tags"], where, "tags") if "tags" in obj else []
    examples = _strings(obj["examples"], where, "examples") if "examples" in obj else []
    return Reply(rid, text, stage, tags, examples)


def read_replies(path: str | Path) -> list[Reply]:
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"replies file {p} does not exist; pass a JSONL file of approved replies")
    replies: list[Reply] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimlmError(f"{where}: not valid JSON ({e.msg}); one JSON object per line") from None
            reply = parse_reply(obj, where)
            if reply.id in seen:
                raise SlimlmError(f"{where}: duplicate id {reply.id!r} (first on line {seen[reply.id]})")
            seen[reply.id] = n
            replies.append(reply)
    if not replies:
        raise SlimlmError(
            f"replies file {p} has no replies; add one JSON object per line with 'id' and 'text'"
        )
    return replies


def rows_of(replies: list[Reply]) -> tuple[list[str], list[int]]:
    """The texts to embed (each reply's text, then its examples) and, per row, its reply's index."""
    texts, owners = [], []
    for i, r in enumerate(replies):
        for t in (r.text, *r.examples):
            texts.append(t)
            owners.append(i)
    return texts, owners
