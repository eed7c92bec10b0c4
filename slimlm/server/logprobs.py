"""Logprobs as OpenAI shapes them, beyond the per-generated-token entries in responses.py.

* Prompt logprobs (`/v1/completions` with `echo: true, logprobs: k`): one entry per prompt token, the
  first `null` (nothing precedes it), as OpenAI's legacy API returns and as lm-eval's
  `local-completions` slices for loglikelihood tasks (`token_logprobs[ctxlen:-1]`).
* Chat content logprobs cover the tokens of `message.content` only: the end-of-turn token that stopped
  generation is not content, so it is not in `logprobs.content` either (OpenAI's behaviour). It is
  still counted in `usage.completion_tokens`, as vLLM counts it: the model generated it.
"""

from __future__ import annotations

import dataclasses

from slimlm.engine.engine import StepOutput
from slimlm.engine.params import SamplingParams
from slimlm.engine.sampling import TokenLogprobs


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def prompt_logprobs_dict(tokenizer, prompt_ids: list[int], entries: list[TokenLogprobs | None]) -> dict:
    """Completion-style logprobs of the echoed prompt: tokens, token_logprobs, top_logprobs and
    text_offset (offsets into the echoed text, which starts the choice's text)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(entry.logprob)
            top.append({_token_text(tokenizer, t): lp for t, lp in entry.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def prepend_prompt_logprobs(prompt_part: dict, generated: dict | None) -> dict:
    """The prompt's entries, then the generated tokens' (whose offsets already follow the echo)."""
    if not generated:
        return prompt_part
    return {key: prompt_part[key] + generated[key] for key in prompt_part}


def add_prompt_logprobs(body: dict, prompt_parts: list[dict], n: int) -> dict:
    """Put each prompt's logprobs in front of its choices' (choice i belongs to prompt i // n)."""
    for i, choice in enumerate(body["choices"]):
        choice["logprobs"] = prepend_prompt_logprobs(prompt_parts[i // n], choice["logprobs"])
    return body


def is_hidden_stop_token(
    out: StepOutput, params: SamplingParams, eos_token_ids: list[int], tokenizer
) -> bool:
    """True for the token that ended generation without being part of the content (EOS / end of turn,
    or a special stop_token_id): its text is not in message.content, so neither is its logprob."""
    if not out.finished or out.finish_reason != "stop" or out.token_id is None:
        return False
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    if out.token_id not in stops:
        return False
    return tokenizer.decode([out.token_id], skip_special_tokens=params.skip_special_tokens) == ""


def content_only(out: StepOutput, params: SamplingParams, eos_token_ids: list[int], tokenizer) -> StepOutput:
    """`out` without its logprob when its token is the hidden stop token (chat responses)."""
    if out.logprob is not None and is_hidden_stop_token(out, params, eos_token_ids, tokenizer):
        return dataclasses.replace(out, logprob=None)
    return out
