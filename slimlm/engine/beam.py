"""Beam search through the model: beams live in rows of a contiguous cache that is reordered each step."""

from __future__ import annotations

import torch

from slimlm.engine.beam_search import BeamSearch
from slimlm.engine.params import SamplingParams
from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata


@torch.inference_mode()
def beam_search(llm, prompt_ids: list[int], params: SamplingParams):
    """HF transformers' beam search semantics (see BeamSearch); returns the best hypothesis."""
    from slimlm.engine.llm import RequestOutput

    model = llm.loaded.model
    config = llm.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype  # the compute dtype (the embedding may be quantized)
    search = BeamSearch.from_params(params, llm.engine.eos_token_ids)
    n = params.num_beams
    cache = ContiguousKVCache(config, n, len(prompt_ids) + params.max_tokens, dtype=dtype, device=device)
    prompt = torch.tensor(prompt_ids, device=device)
    hidden = model(
        prompt,
        torch.arange(len(prompt_ids), device=device),
        cache,
        AttnMetadata.single(len(prompt_ids), len(prompt_ids)),
    )
    logits = model.compute_logits(hidden[-1:])
    context = len(prompt_ids)
    while not search.done:
        picks = search.step(torch.log_softmax(logits, dim=-1)[: len(search.beams)])
        if not picks:
            break
        parents = torch.tensor([p for p, _ in picks], device=device)
        tokens = torch.tensor([t for _, t in picks], device=device)
        rows = len(picks)
        # Each surviving beam continues from its parent's cache row.
        cache.k[:, :rows] = cache.k[:, parents]
        cache.v[:, :rows] = cache.v[:, parents]
        context += 1
        meta = AttnMetadata(query_lens=[1] * rows, context_lens=[context] * rows, slots=list(range(rows)))
        positions = torch.full((rows,), context - 1, device=device)
        logits = model.compute_logits(model(tokens, positions, cache, meta))
    best = search.results()[0]
    ids = list(best.token_ids)
    eos = set(llm.engine.eos_token_ids)
    finish = "stop" if ids and ids[-1] in eos else "length"
    text = llm.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
    return RequestOutput(list(prompt_ids), ids, text, finish)
