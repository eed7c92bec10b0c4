"""Micro-batches from examples: length bucketing or packing, deterministic per (seed, epoch).

The whole order of an epoch is a pure function of the seed and the epoch number, so a resumed run
rebuilds it and skips to the saved position instead of storing a data-loader state.

- bucket: examples shuffled, sorted by length inside windows of 64 batches, cut into batches, and the
  batches shuffled; each batch is right-padded to its longest example (padding gets no loss).
- pack: examples shuffled and concatenated (each ends with the template's end-of-turn or EOS) and cut
  into rows of exactly max_seq_len tokens; a row's attention is causal over the whole row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.train.data import IGNORE_INDEX, Example

BATCHING = ("bucket", "pack")
_BUCKET_WINDOW = 64


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64, -100 where no loss

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.labels.numel())


def split_train_eval(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one when fraction > 0), chosen by the seed."""
    if not 0.0 <= fraction < 1.0:
        raise SlimlmError(f"eval fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return examples, []
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise SlimlmError(
            f"only {len(examples)} example(s): too few to hold out {fraction:.0%} for evaluation"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def epoch_batches(
    examples: list[Example], batch_size: int, strategy: str, max_seq_len: int, seed: int, epoch: int,
    shuffle: bool = True,
) -> list[list[Example]]:  # fmt: skip
    """The micro-batches of one epoch (lists of rows; packed rows are synthetic Examples)."""
    if strategy not in BATCHING:
        raise SlimlmError(f"unknown batching {strategy!r}; use one of {', '.join(BATCHING)}")
    if batch_size <= 0:
        raise SlimlmError(f"batch size must be positive, got {batch_size}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    if strategy == "pack":
        rows = _pack([examples[i] for i in order], max_seq_len)
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    batches = []
    window = batch_size * _BUCKET_WINDOW
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i]))
        batches += [
            [examples[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)
        ]
    if shuffle:
        rng.shuffle(batches)
    return batches


def _pack(examples: list[Example], size: int) -> list[Example]:
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e.input_ids
        # The first token of each example is never predicted from the previous example's tokens.
        labels += [IGNORE_INDEX] + e.labels[1:]
    rows = [Example(ids[i : i + size], labels[i : i + size], "packed") for i in range(0, len(ids), size)]
    return [r for r in rows if r.num_loss_tokens > 0]


def collate(rows: list[Example], pad_id: int) -> MicroBatch:
    """Right-pad rows to the longest: causal attention means real tokens never see the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, : len(r)] = torch.tensor(r.labels, dtype=torch.long)
    return MicroBatch(ids, labels)


__all__ = ["BATCHING", "MicroBatch", "collate", "epoch_batches", "split_train_eval"]
