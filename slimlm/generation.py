"""Reference decoding over a contiguous cache, outside the engine's scheduler and paged pool: one sequence
sampled (`generate_tokens`: the engine's reference in tests and benchmarks) or beams reordered each step
(`beam_search_tokens`: what `LLM.generate` runs for num_beams > 1). Both take the model and run the same
two steps, `prefill` and `decode_step`; the engine (slimlm.engine) is the serving path."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata


def new_cache(model, rows: int, max_tokens: int) -> ContiguousKVCache:
    """`rows` sequences of up to `max_tokens` tokens in the model's compute dtype and device."""
    param = next(model.parameters())  # the compute dtype (the embedding may be quantized)
    return ContiguousKVCache(model.config, rows, max_tokens, dtype=param.dtype, device=param.device)


def prefill(model, cache: ContiguousKVCache, prompt_ids: list[int]) -> torch.Tensor:
    """The prompt into row 0 of `cache`; the logits [1, vocab] of the next token."""
    device = cache.k.device
    n = len(prompt_ids)
    hidden = model(torch.tensor(prompt_ids, device=device), torch.arange(n, device=device), cache,
                   AttnMetadata.single(n, n))  # fmt: skip
    return model.compute_logits(hidden[-1:])


def decode_step(model, cache: ContiguousKVCache, tokens: torch.Tensor, context: int) -> torch.Tensor:
    """One new token in each of rows 0..len(tokens)-1, each row `context` tokens long with it; logits [rows, vocab]."""
    rows = len(tokens)
    meta = AttnMetadata(query_lens=[1] * rows, context_lens=[context] * rows, slots=list(range(rows)))
    positions = torch.full((rows,), context - 1, device=tokens.device)
    return model.compute_logits(model(tokens, positions, cache, meta))


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
    cache = new_cache(model, 1, len(prompt_ids) + max_tokens)
    device = cache.k.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    logits = prefill(model, cache, prompt_ids)[0]
    context, token = len(prompt_ids), None
    for _ in range(max_tokens):
        if token is not None:
            context += 1
            logits = decode_step(model, cache, torch.tensor([token], device=device), context)[0]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(torch.argmax(logits))
        yield token
        if token in eos_token_ids:
            return


@torch.inference_mode()
def beam_search_tokens(
    model, prompt_ids: list[int], search, max_tokens: int, step: Callable[[], None] = lambda: None
):
    """Drive `search` (slimlm.engine.beam_search.BeamSearch: the pure logic) with the model; returns it done.
    Beams live in rows of one contiguous cache; each surviving beam continues from its parent's row."""
    cache = new_cache(model, search.num_beams, len(prompt_ids) + max_tokens)
    device = cache.k.device
    logits = prefill(model, cache, prompt_ids)
    context = len(prompt_ids)
    while not search.done:
        picks = search.step(torch.log_softmax(logits, dim=-1)[: len(search.beams)])
        step()
        if not picks:
            break
        parents = torch.tensor([p for p, _ in picks], device=device)
        rows = len(picks)
        cache.k[:, :rows] = cache.k[:, parents]
        cache.v[:, :rows] = cache.v[:, parents]
        context += 1
        logits = decode_step(model, cache, torch.tensor([t for _, t in picks], device=device), context)
    return search


__all__ = ["beam_search_tokens", "decode_step", "generate_tokens", "new_cache", "prefill"]
