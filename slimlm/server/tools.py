"""OpenAI `tools` / `tool_choice` on chat completions: validation, prompt rendering, forced calls, parsing.

- The model's own chat template renders the tools (HF's `tools` argument) when it knows them (it
  mentions `tools`, as Qwen2/2.5's does). Templates that ignore tools (SmolLM2's) get them as a system
  message in the Hermes format instead, with earlier calls and results written as text.
- `tool_choice` "required" or a named function constrains decoding (slimlm.engine.constraints): a named
  call generates exactly the function's arguments (its `parameters` schema); "required" generates a JSON
  array of {"name", "arguments"} objects (one item unless `parallel_tool_calls`), as vLLM does.
- "auto" generates freely and parses the family's call format (`tool_parsers.py`); "none" parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from slimlm.engine.structured import StructuredOutputs
from slimlm.server.errors import APIError
from slimlm.server.tool_parsers import ToolCallParser, parser_for_template

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMPTY_PARAMS = {"type": "object", "properties": {}}
HERMES_SYSTEM = (
    "You are a function calling AI model. You may call one or more functions to assist with the user "
    "query. The functions are described as JSON schemas within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolPlan:
    """What one chat request asked of tools, decided once in `plan_tools`."""

    tools: list[dict]  # {"type": "function", "function": {"name", "description"?, "parameters"}}
    mode: str  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function of a named tool_choice
    parallel: bool = True
    parser: ToolCallParser | None = None
    schemas: dict[str, dict] = field(default_factory=dict)  # function name -> parameters schema

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self) -> StructuredOutputs | None:
        """The output constraint a forced call needs (None for auto / none). Objects that do not say
        otherwise get no properties beyond the declared ones (OpenAI's strict function calling):
        a small model otherwise keeps inventing keys until max_tokens."""
        if self.mode == "named":
            return StructuredOutputs(json=closed(self.schemas[self.name]))  # type: ignore[index]
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": closed(schema)},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name, schema in self.schemas.items()
            ]
            array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
            if not self.parallel:
                array["maxItems"] = 1
            return StructuredOutputs(json=array)
        return None


def closed(schema: Any) -> Any:
    """A copy of `schema` where objects with declared properties allow no others, unless they say so."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def plan_tools(
    tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None, template: str | None
) -> ToolPlan | None:
    """Validate `tools` and `tool_choice` (400 naming the field) -> the plan, or None without tools."""
    if not tools:
        if tools is not None:
            raise APIError(400, "'tools' is empty; send at least one tool or leave it out", param="tools")
        if tool_choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    schemas: dict[str, dict] = {}
    normalized = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise APIError(400, f"{where}.type must be 'function'", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{where}.function must be an object", param=f"{where}.function")
        extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if extra:
            raise APIError(400, f"{where}.function has unknown field(s) {extra}", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(
                400,
                f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                param=f"{where}.function.name",
            )
        if name in schemas:
            raise APIError(400, f"{where}: two tools are named {name!r}", param=f"{where}.function.name")
        params = fn.get("parameters", _EMPTY_PARAMS)
        if not isinstance(params, dict):
            raise APIError(
                400, f"{where}.function.parameters must be a JSON schema object", param=f"{where}.function"
            )
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise APIError(400, f"{where}.function.description must be a string", param=f"{where}.function")
        schemas[name] = params
        normalized.append({"type": "function", "function": {**fn, "parameters": params}})
    mode, name = _choice(tool_choice, schemas)
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    return ToolPlan(normalized, mode, name, parallel, parser_for_template(template), schemas)


def _choice(tool_choice: Any, schemas: dict[str, dict]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none", "required"):
            return tool_choice, None
        raise APIError(
            400,
            f"'tool_choice' {tool_choice!r} is not valid; use auto, none, required or "
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if (
        not isinstance(tool_choice, dict)
        or tool_choice.get("type") != "function"
        or not isinstance(name, str)
    ):
        raise APIError(
            400,
            '\'tool_choice\' must be auto, none, required or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in schemas:
        raise APIError(
            400,
            f"'tool_choice' names function {name!r}, which is not in 'tools' ({', '.join(schemas)})",
            param="tool_choice",
        )
    return "named", name


# ---- the conversation the template sees ----
def tool_template(tokenizer) -> str | None:
    """The template a request with tools renders with (a "tool_use" one where the model has several)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("tool_use", template.get("default"))
    return template


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def conversation(
    messages: list[dict], plan: ToolPlan | None, template: str | None
) -> tuple[list[dict], list | None]:
    """-> (messages, tools) for `apply_chat_template`. Arguments strings become dicts (templates
    `tojson` them, as vLLM passes them); templates that ignore tools get the Hermes text form."""
    messages = [_arguments_as_dicts(m) for m in messages]
    if template_knows_tools(template):
        return messages, (plan.tools if plan is not None else None)
    out = [_as_text(m) for m in messages]
    if plan is not None:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools)
        system = HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, None


def _arguments_as_dicts(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # not JSON: the template prints the string as it came
        fixed.append({**call, "function": fn})
    return {**message, "tool_calls": fixed}


def _as_text(message: dict) -> dict:
    """Tool calls and results as Hermes text, for templates that only print role and content."""
    role = message["role"]
    content = message.get("content") or ""
    if role == "assistant" and message.get("tool_calls"):
        calls = [
            "<tool_call>\n"
            + json.dumps(
                {"name": c["function"].get("name"), "arguments": c["function"].get("arguments", {})},
                ensure_ascii=False,
            )
            + "\n</tool_call>"
            for c in message["tool_calls"]
        ]
        return {"role": "assistant", "content": "\n".join(([content] if content else []) + calls)}
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    return {"role": role, "content": content}


# ---- the answer ----
def call_dict(name: str, arguments: str, call_id: str | None = None) -> dict:
    return {
        "id": call_id or new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_output(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of one finished choice. A forced call cut by max_tokens keeps its text as
    content and no calls (finish_reason stays "length")."""
    if plan.mode == "none":
        return text, []
    if plan.forced:
        if finish_reason != "stop":
            return text, []
        if plan.mode == "named":
            return None, [call_dict(plan.name, text.strip())]  # type: ignore[arg-type]
        try:  # the grammar made it valid; a stop string can still cut it short
            return None, [
                call_dict(item["name"], json.dumps(item["arguments"], ensure_ascii=False))
                for item in json.loads(text)
            ]
        except (ValueError, TypeError, KeyError):
            return text, []
    assert plan.parser is not None
    content, calls = plan.parser.parse(text, set(plan.schemas))
    if not plan.parallel:
        calls = calls[:1]
    return content, [call_dict(name, args) for name, args in calls]


def apply_to_body(body: dict, plan: ToolPlan) -> dict:
    """Turn the plain chat completion body's messages into tool-call messages where calls were made."""
    for choice in body["choices"]:
        message = choice["message"]
        content, calls = parse_output(plan, message["content"], choice["finish_reason"])
        message["content"] = content
        if calls:
            message["tool_calls"] = calls
            choice["finish_reason"] = "tool_calls"
    return body


class ToolStream:
    """One streamed choice: text in, OpenAI `delta` dicts out.

    A named call streams its arguments as they are generated; "auto" streams content until the
    family's call marker shows up and then holds the rest back; "required" holds everything back.
    At the end the held text is parsed and each call goes out as one `delta.tool_calls` item.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of `text` already sent as content or arguments
        self.started = False  # a named call's header chunk went out
        self.call_id = new_call_id()

    def feed(self, text: str) -> list[dict]:
        self.text += text
        plan = self.plan
        if plan.mode == "none":
            return self._content_upto(len(self.text))
        if plan.mode == "named":
            deltas = []
            if not self.started:
                self.started = True
                header = {"index": 0, "id": self.call_id, "type": "function"}
                deltas.append({"tool_calls": [{**header, "function": {"name": plan.name, "arguments": ""}}]})
            piece, self.sent = self.text[self.sent :], len(self.text)
            if piece:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            return deltas
        if plan.mode == "required":
            return []
        assert plan.parser is not None
        return self._content_upto(plan.parser.safe_prefix(self.text))

    def _content_upto(self, end: int) -> list[dict]:
        if end <= self.sent:
            return []
        piece, self.sent = self.text[self.sent : end], end
        return [{"content": piece}]

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """-> the last deltas and the finish reason to send."""
        plan = self.plan
        if plan.mode == "none":
            return self._content_upto(len(self.text)), finish_reason
        if plan.mode == "named":
            return [], ("tool_calls" if finish_reason == "stop" else finish_reason)
        held = self.text[self.sent :]
        if plan.mode == "auto":
            content, calls = parse_output(plan, held, finish_reason)
        else:
            content, calls = parse_output(plan, self.text, finish_reason)
        deltas = [{"content": content}] if content else []
        if calls:
            deltas.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
            return deltas, "tool_calls"
        return deltas, finish_reason
