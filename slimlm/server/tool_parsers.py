"""Free-form (`tool_choice: auto`) tool calls in a model family's own format, found in generated text.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them is
  content. Qwen2 / Qwen2.5 templates and NousResearch Hermes use it; so does slimlm's fallback prompt
  for templates that ignore tools (SmolLM2's).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral v3+ templates).
- llama3_json: the whole answer is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>` (Llama 3.1 / 3.2 templates).
The format is picked from the chat template's text (`parser_for_template`).
"""

from __future__ import annotations

import json
import re


def _args_text(args: object) -> str | None:
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else None


def _call(obj: object, names: set[str], args_key: str = "arguments") -> tuple[str, str] | None:
    """(name, arguments JSON) of a call object naming a known function, else None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = _args_text(obj.get(args_key, obj.get("arguments", {})))
    return (obj["name"], args) if args is not None else None


class ToolCallParser:
    """Base: `parse(text, names) -> (content, [(name, arguments JSON)])`; `safe_prefix(text)` is how much
    of a partial stream is surely content (it cannot be the start of a call)."""

    name = "base"
    marker = ""

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
        raise NotImplementedError

    def safe_prefix(self, text: str) -> int:
        at = text.find(self.marker)
        if at >= 0:
            return at
        # hold back a tail that could still grow into the marker
        for keep in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class HermesParser(ToolCallParser):
    name = "hermes"
    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
        calls = []
        for match in self._CALL.finditer(text):
            try:
                call = _call(json.loads(match.group(1)), names)
            except ValueError:
                call = None
            if call is None:
                return text, []  # a malformed call: the caller sees the text as it came
            calls.append(call)
        if not calls:
            return text, []
        content = self._CALL.sub("", text).strip()
        return content or None, calls


class MistralParser(ToolCallParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
        at = text.find(self.marker)
        if at < 0:
            return text, []
        try:
            items, _ = json.JSONDecoder().raw_decode(text[at + len(self.marker) :].lstrip())
        except ValueError:
            return text, []
        items = items if isinstance(items, list) else [items]
        calls = [_call(item, names) for item in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return text[:at].strip() or None, calls  # type: ignore[return-value]


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    marker = "<|python_tag|>"

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
        body = text.strip().removeprefix(self.marker).strip()
        calls = []
        for part in (p for p in body.split(";") if p.strip()) if body.startswith("{") else []:
            try:
                call = _call(json.loads(part), names, "parameters")
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])

    def safe_prefix(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped[0] == "{" or self.marker.startswith(stripped[: len(self.marker)]):
            return 0  # may be a call: hold it all until the end
        return len(text)


PARSERS = {p.name: p for p in (HermesParser(), MistralParser(), Llama3JsonParser())}


def parser_for_template(template: str | None) -> ToolCallParser:
    """The format the template teaches; Hermes where it teaches none (slimlm's fallback prompt)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return PARSERS["mistral"]
    if "<|python_tag|>" in text or ('"parameters"' in text and "<|eot_id|>" in text):
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]
