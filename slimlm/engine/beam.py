"""Beam search for `LLM.generate`: the request's checks against the engine's limits, then the reference
decoder's beam loop (slimlm.generation.beam_search_tokens) over the model."""

from __future__ import annotations

from slimlm.engine.beam_search import BeamSearch
from slimlm.engine.outputs import RequestOutput
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.generation import beam_search_tokens
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


def beam_search(llm, prompt_ids: list[int], params: SamplingParams):
    """HF transformers' beam search semantics (see BeamSearch); returns the best hypothesis.

    A progress bar over the generated tokens shows when `llm.show_progress` is set (the CLI sets it)."""
    check_beam_request(llm, len(prompt_ids), params)
    search = BeamSearch.from_params(params, llm.engine.eos_token_ids)
    show = getattr(llm, "show_progress", False)
    with progress_bar(f"beam search ({params.num_beams} beams)", params.max_tokens, show) as step:
        beam_search_tokens(llm.loaded.model, prompt_ids, search, params.max_tokens, step)
    best = search.results()[0]
    ids = list(best.token_ids)
    eos = set(llm.engine.eos_token_ids)
    finish = "stop" if ids and ids[-1] in eos else "length"
    text = llm.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
    return RequestOutput(list(prompt_ids), ids, text, finish)
