"""Chat templates rendered the way transformers' `apply_chat_template` renders them.

Templates come from model files, so they run in Jinja's immutable sandbox with the same settings and
helpers transformers gives them (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML, a `{% generation %}` tag), and see the same
variables: messages, add_generation_prompt, tools, documents, the special tokens, any extra kwargs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slimlm.errors import SlimlmError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise SlimlmError(
            f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message})"
        ) from None


def validate_messages(messages: Any) -> None:
    """A conversation is a non-empty list of {'role': str, 'content': str} dicts (content may also be a list
    of content-part dicts, or absent on an assistant message that carries tool_calls)."""
    hint = "pass a list like [{'role': 'user', 'content': 'Hello'}]"
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise SlimlmError(f"messages must be a list of message dicts, got {type(messages).__name__}; {hint}")
    if not messages:
        raise SlimlmError(f"messages is empty; {hint}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise SlimlmError(f"message {index} is a {type(message).__name__}, not a dict; {hint}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise SlimlmError(
                f"message {index} has no 'role' string (e.g. 'system', 'user', 'assistant'); {hint}"
            )
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue
        if isinstance(content, str):
            continue
        if isinstance(content, list) and all(isinstance(part, Mapping) for part in content):
            continue
        got = "no 'content'" if content is None else f"'content' of type {type(content).__name__}"
        raise SlimlmError(f"message {index} (role {role!r}) has {got}; content must be a string")


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render one conversation to the prompt string (not tokenized)."""
    validate_messages(messages)
    if continue_final_message and add_generation_prompt:
        raise SlimlmError("continue_final_message and add_generation_prompt cannot both be set; pick one")
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise SlimlmError(
            "tools must be a list of JSON-schema dicts ({'type': 'function', 'function': {...}})"
        )
    if documents is not None and not all(isinstance(doc, Mapping) for doc in documents):
        raise SlimlmError("documents must be a list of dicts with 'title' and 'text' keys")
    # Keys set to None are dropped: templates test for a key's presence, and would print "None".
    chat = [{k: v for k, v in message.items() if v is not None} for message in messages]
    chat = _alias_reasoning(_plain(chat))
    final = None
    if continue_final_message:
        final = chat[-1].get("content")
        if not isinstance(final, str):
            raise SlimlmError("continue_final_message needs the last message to have string content")
        chat[-1]["content"] = final + _CONTINUE_TAG
    variables = {**special_tokens, **_plain(kwargs)}
    try:
        rendered = compile_template(template).render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
    ) as e:  # raise_exception(...) or a template/input mismatch
        raise SlimlmError(f"the model's chat template rejected this conversation: {e}") from None
    if final is not None:
        rendered = _cut_at_continue_tag(rendered, final)
    return rendered


def _cut_at_continue_tag(rendered: str, final: str) -> str:
    """End the prompt right after the final message's text, so the model continues it."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise SlimlmError("continue_final_message: the chat template dropped part of the final message")
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """Templates read a message's reasoning as `reasoning_content` (gpt-oss: `thinking`); accept any of the names."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only: the sandbox must not see methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
