"""Single-sequence generation over a contiguous cache: the simple path and the engine's reference."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata


@torch.inference_mode()
def generate_tokens(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    eos_token_ids: list[int] | tuple[int, ...] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """Yields generated token ids one by one; greedy when temperature == 0."""
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype  # the compute dtype (the embedding may be quantized)
    total = len(prompt_ids) + max_tokens
    cache = ContiguousKVCache(config, 1, total, dtype=dtype, device=device)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    tokens = torch.tensor(prompt_ids, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    context = len(prompt_ids)
    for _ in range(max_tokens):
        meta = AttnMetadata.single(len(tokens), context)
        logits = model.compute_logits(model(tokens, positions, cache, meta)[-1:])[0]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(torch.argmax(logits))
        yield token
        if token in eos_token_ids:
            return
        tokens = torch.tensor([token], device=device)
        positions = torch.tensor([context], device=device)
        context += 1
