"""OpenAI request -> prompt token ids and SamplingParams for the engine (and nothing else)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimlm.engine.params import SamplingParams
from slimlm.engine.structured import StructuredOutputs
from slimlm.errors import SlimlmError
from slimlm.server.errors import APIError, from_slimlm_error
from slimlm.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from slimlm.server.structured_request import check_structure, requested_structure
from slimlm.server.tools import ToolPlan, conversation, plan_tools, tool_template
from slimlm.server.validation import check_kv_room, pool_tokens

MAX_N = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# generation_config.json keys that set the server's defaults (vLLM's "--generation-config auto")
_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Prepared:
    """What the engine runs for one HTTP request: choice i is `requests[i]`, prompt i // n."""

    prompts: list[list[int]]
    n: int
    requests: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    echo_texts: list[str] = field(default_factory=list)  # per prompt, when echo is asked
    tools: ToolPlan | None = None  # chat requests with tools: how answers become tool calls

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    if not req.messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; use system, user, assistant or tool",
                param=f"messages[{i}].role",
            )
        if m.content is None:
            if role != "assistant":
                raise APIError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"messages[{i}] has a content part of type {part.type!r}; only text parts "
                        "are supported",
                        param=f"messages[{i}].content",
                    )
            text = "".join(part.text for part in m.content)  # type: ignore[misc]
        message = {"role": role, "content": text}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def prepare_chat(llm, req: ChatCompletionRequest) -> Prepared:
    messages = chat_messages(req)
    _check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    template = tool_template(llm.tokenizer)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, template)
    structure, source = requested_structure(req)
    if plan is not None and plan.forced:
        if structure is not None:
            raise APIError(400, f"a forced tool call cannot be combined with {source}", param=source)
        structure, source = plan.constraint(), "tools"
    if structure is not None:
        check_structure(llm, structure, source)  # type: ignore[arg-type]
    messages, tools = conversation(messages, plan, template)
    try:
        prompt = llm.chat_prompt(messages, tools=tools)
    except SlimlmError as e:
        raise from_slimlm_error(e) from None
    except Exception as e:  # the template itself refused the conversation (jinja raise_exception)
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    prepared = _prepare(llm, req, [prompt], max_tokens, logprobs, "messages", structure)
    prepared.tools = plan
    return prepared


def prepare_completion(llm, req: CompletionRequest) -> Prepared:
    _check_common(req)
    if req.suffix is not None:
        raise APIError(400, "'suffix' is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of")
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]  # type: ignore[list-item]
    if not raw:
        raise APIError(
            400, "'prompt' is empty; send a string, a list of strings or token ids", param="prompt"
        )
    try:
        prompts = [llm.encode_prompt(p) for p in raw]
    except SlimlmError as e:
        raise APIError(400, f"invalid prompt: {e}", param="prompt") from None
    structure, source = requested_structure(req)
    if structure is not None:
        check_structure(llm, structure, source)  # type: ignore[arg-type]
    score_only = req.max_tokens == 0  # echo (checked in validation): the prompt's logprobs, no tokens
    prepared = _prepare(
        llm, req, prompts, 1 if score_only else req.max_tokens, req.logprobs, "prompt", structure
    )
    if score_only:
        prepared.requests = []
    if req.echo:
        # token-id prompts echo every token's text (special ones too), as their logprobs list them
        prepared.echo_texts = [
            p if isinstance(p, str) else llm.tokenizer.decode(p, skip_special_tokens=False) for p in raw
        ]
    return prepared


def _check_common(req: _SamplingFields) -> None:
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {req.n}", param="n")
    if req.logit_bias:
        raise APIError(400, "'logit_bias' is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")


def _prepare(
    llm,
    req: _SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    prompt_field: str,
    structure: StructuredOutputs | None = None,
) -> Prepared:
    limit = llm.engine.max_model_len
    defaults = {k: v for k, v in llm.loaded.generation_config.items() if k in _DEFAULT_KEYS}
    prepared = Prepared(prompts, req.n)
    for prompt in prompts:
        room = limit - len(prompt)
        if room < 1 or (max_tokens is not None and len(prompt) + max_tokens > limit):
            asked = len(prompt) + (max_tokens if max_tokens is not None else 1)
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens "
                f"({len(prompt)} in the {prompt_field}, {asked - len(prompt)} in the completion). Please reduce "
                f"the length of the {prompt_field} or the completion.",
                param=prompt_field,
                code="context_length_exceeded",
            )
        # the whole KV pool bounds one sequence too; without max_tokens the answer may fill the pool
        room = min(room, pool_tokens(llm) - len(prompt))
        check_kv_room(llm, len(prompt), max_tokens if max_tokens is not None else 1, prompt_field)
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i  # n samples from one seed must differ
            params = _sampling_params(
                req, max_tokens if max_tokens is not None else room, logprobs, seed, defaults, structure
            )
            prepared.requests.append((prompt, params))
    return prepared


def _pick(value, default_key: str, defaults: dict, fallback):
    return value if value is not None else defaults.get(default_key, fallback)


def _sampling_params(
    req: _SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    seed: int | None,
    defaults: dict,
    structure: StructuredOutputs | None = None,
) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=_pick(req.temperature, "temperature", defaults, 1.0),
            top_p=_pick(req.top_p, "top_p", defaults, 1.0),
            top_k=_pick(req.top_k, "top_k", defaults, 0),
            min_p=_pick(req.min_p, "min_p", defaults, 0.0),
            repetition_penalty=_pick(req.repetition_penalty, "repetition_penalty", defaults, 1.0),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            no_repeat_ngram_size=req.no_repeat_ngram_size or 0,
            seed=seed,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            structured_outputs=structure,
        )
    except SlimlmError as e:
        raise from_slimlm_error(e) from None
