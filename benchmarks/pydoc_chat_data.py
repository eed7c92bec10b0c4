"""Conversations built from CPython's pydoc topics (text nobody here wrote), for the training demo.

"Explain the Python topic 'X'." -> the first prose paragraph of topic X (whitespace normalised).
Every 8th topic (offset 3) is held out, so the held-out loss measures what generalises.
"""

from __future__ import annotations

import json
from pathlib import Path


def first_paragraph(text: str) -> str:
    blocks = [b for b in text.split("\n\n")[1:] if b.strip()]
    prose = [
        b for b in blocks if not b.startswith(" ") and not b.lstrip().startswith(("New in", "Changed in"))
    ]
    return " ".join((prose or blocks)[0].split())


def pydoc_conversations() -> list[dict]:
    from pydoc_data.topics import topics

    return [
        {
            "conversation": [
                {"input": f"Explain the Python topic '{key}'.", "output": first_paragraph(topics[key])}
            ]
        }
        for key in sorted(topics)
    ]


def write_split(out_dir: Path) -> tuple[Path, Path, list[dict]]:
    """Write train.jsonl and eval.jsonl; returns their paths and the held-out records."""
    records = pydoc_conversations()
    held = [r for i, r in enumerate(records) if i % 8 == 3]
    train = [r for i, r in enumerate(records) if i % 8 != 3]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        path = out_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1], held
