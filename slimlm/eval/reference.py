"""Reference log-probabilities saved once and reused: `slimlm eval ppl --save-ref-logits DIR`, then
`--ref-logits DIR` for every variant (as llama.cpp's `--kl-divergence-base`).

A directory with `logprobs.npy` (float16 [scored tokens, vocab], memory-mapped on read) and
`meta.json`: the reference model's shape (vocab, hidden size, layers, heads), a hash of the scored
token ids (another tokenizer or text gives other ids) and the windows. Reusing it with a model of
another shape, another tokenizer, text or windows is an error that says which. float16 keeps the
log-probability of any token with p > 1e-4 to better than 1e-3 relative; the KL it gives differs from
the float32 one by far less than the differences it is used to rank (tested).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from slimlm.errors import SlimlmError

FORMAT = "slimlm-ref-logprobs-1"


def model_shape(config) -> dict:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "model_type": getattr(config, "model_type", None),
    }


def ids_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


class ReferenceWriter:
    """Writes scored rows as they come, to a memory-mapped float16 file of known size."""

    def __init__(self, path: str | Path, rows: int, vocab: int, meta: dict) -> None:
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(
            self.dir / "logprobs.npy", mode="w+", dtype=np.float16, shape=(rows, vocab)
        )
        self.meta, self.row = {"format": FORMAT, **meta}, 0

    def add(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Stores [n, vocab] log-probs; returns them as stored (float16), for the same-run comparison."""
        half = logprobs.to(torch.float16)
        self.array[self.row : self.row + len(half)] = half.numpy()
        self.row += len(half)
        return half

    def close(self) -> None:
        self.array.flush()
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=2))


class ReferenceReader:
    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file() or not (self.dir / "logprobs.npy").is_file():
            raise SlimlmError(
                f"{self.dir} holds no reference logits (meta.json + logprobs.npy); "
                "write them first with slimlm eval ppl --save-ref-logits DIR"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise SlimlmError(f"{self.dir} is not a slimlm reference-logits directory ({FORMAT})")
        self.array = np.load(self.dir / "logprobs.npy", mmap_mode="r")
        self.row = 0

    def check(self, meta: dict) -> None:
        """Error unless `meta` (this run's model shape, token ids and windows) matches the reference's."""
        ref = self.meta
        if ref["model"] != meta["model"]:
            diff = ", ".join(
                f"{k} {ref['model'].get(k)} vs {v}"
                for k, v in meta["model"].items()
                if ref["model"].get(k) != v
            )
            raise SlimlmError(
                f"the reference logits in {self.dir} come from another model ({diff}); "
                "save a reference with this model's base"
            )
        if ref["ids_hash"] != meta["ids_hash"] or ref["num_ids"] != meta["num_ids"]:
            raise SlimlmError(
                f"the reference logits in {self.dir} were computed on other token ids "
                f"({ref['num_ids']} ids, hash {ref['ids_hash']}; now {meta['num_ids']}, {meta['ids_hash']}): "
                "another tokenizer, text or --max-tokens"
            )
        for key in ("context", "stride"):
            if ref[key] != meta[key]:
                raise SlimlmError(f"the reference logits used --{key} {ref[key]}, this run {meta[key]}")

    def next(self, n: int) -> torch.Tensor:
        rows = torch.from_numpy(np.array(self.array[self.row : self.row + n]))
        self.row += n
        return rows
