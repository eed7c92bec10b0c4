"""Beam search through the model: beams live in rows of a contiguous cache that is reordered each step."""

from __future__ import annotations

import torch

from slimlm.engine.beam_search import BeamSearch
from slimlm.engine.outputs import RequestOutput
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata
from slimlm.progress import progress_bar

# Each step runs num_beams rows and keeps 2 x num_beams candidates: beyond this the search is all cost
# (minutes per token at 100,000 beams) for no gain in practice.
MAX_NUM_BEAMS = 64


def check_num_beams(n: int) -> None:
    if n > MAX_NUM_BEAMS:
        raise SlimlmError(f"--num-beams {n} is too many: at most {MAX_NUM_BEAMS}")


def check_beam_request(llm, prompt_len: int, params: SamplingParams) -> None:
    """Beams keep their own cache of num_beams x (prompt + max_tokens) tokens: bound it by the KV budget
    the user gave the engine, and the beam count by MAX_NUM_BEAMS."""
    n = params.num_beams
    check_num_beams(n)
    engine = llm.engine
    length = prompt_len + params.max_tokens
    if length > engine.max_model_len:
        raise SlimlmError(
            f"the prompt ({prompt_len} tokens) + --max-tokens {params.max_tokens} exceed the context limit "
            f"{engine.max_model_len}; lower --max-tokens"
        )
    pool_tokens = engine.budget.num_blocks * engine.config.block_size
    if n * length > pool_tokens:
        raise SlimlmError(
            f"{n} beams x ({prompt_len} prompt + {params.max_tokens} new tokens) = {n * length} KV tokens, "
            f"but the KV budget is {pool_tokens} tokens; lower --num-beams or --max-tokens, or raise --kv-cache-tokens"
        )


@torch.inference_mode()
def beam_search(llm, prompt_ids: list[int], params: SamplingParams):
    """HF transformers' beam search semantics (see BeamSearch); returns the best hypothesis.

    A progress bar over the generated tokens shows when `llm.show_progress` is set (the CLI sets it)."""
    check_beam_request(llm, len(prompt_ids), params)
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
    with progress_bar(
        f"beam search ({n} beams)", params.max_tokens, getattr(llm, "show_progress", False)
    ) as step:
        while not search.done:
            picks = search.step(torch.log_softmax(logits, dim=-1)[: len(search.beams)])
            step()
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
