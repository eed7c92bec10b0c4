"""Fallback replies per dialogue stage, several variants (experiment arms) each, chosen per user.

File shape: {"default": ["...", "..."], "greeting": ["...", "..."], ...}; `default` is the universal
fallback and must be present. A user's arm is a hash of the `user` string, so the same user always
sees the same variant of a stage (stable across restarts and machines, unlike Python's hash()).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimlmError

UNIVERSAL = "default"


@dataclass(frozen=True)
class FallbackChoice:
    text: str
    stage: str  # the stage whose variants were used (UNIVERSAL when the asked stage is unknown)
    arm: int
    requested_stage: str | None  # what the request asked for (None: no stage given)

    @property
    def unknown_stage(self) -> bool:
        return self.requested_stage is not None and self.requested_stage != self.stage


def arm_for(user: str | None, arms: int) -> int:
    """Deterministic arm in [0, arms): sha256 of the user id (no user -> the empty string's arm)."""
    digest = hashlib.sha256((user or "").encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % arms


class Fallbacks:
    def __init__(self, stages: dict[str, list[str]], source: str = "fallbacks") -> None:
        if not isinstance(stages, dict):
            raise SlimlmError(f"{source}: must be a JSON object mapping stage -> list of replies")
        if UNIVERSAL not in stages:
            raise SlimlmError(
                f"{source}: the universal fallback '{UNIVERSAL}' is missing; add \"default\": [...]"
            )
        for stage, variants in stages.items():
            if isinstance(variants, str):
                variants = [variants]
            if (
                not isinstance(variants, list)
                or not variants
                or not all(isinstance(v, str) and v.strip() for v in variants)
            ):
                raise SlimlmError(
                    f"{source}: stage '{stage}' must be a non-empty list of non-empty strings (the variants)"
                )
        self.stages = {k: [v] if isinstance(v, str) else list(v) for k, v in stages.items()}

    @classmethod
    def load(cls, path: str | Path) -> Fallbacks:
        p = Path(path)
        if not p.is_file():
            raise SlimlmError(f"fallbacks file {p} does not exist; pass --guard-fallbacks FILE.json")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SlimlmError(f"fallbacks file {p} is not valid JSON ({e}); fix it") from None
        return cls(data, str(p))

    @classmethod
    def universal(cls, text: str) -> Fallbacks:
        return cls({UNIVERSAL: [text]})

    def choose(self, stage: str | None, user: str | None) -> FallbackChoice:
        used = stage if stage in self.stages else UNIVERSAL
        variants = self.stages[used]
        arm = arm_for(user, len(variants))
        return FallbackChoice(variants[arm], used, arm, stage)
