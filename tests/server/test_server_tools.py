"""OpenAI tools through the official openai client on a real server: forced calls, the tool round trip
(streamed and not), bad tool requests; the template rendering against transformers; the parsers."""

from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance", reason="forced tool calls need: pip install 'slimlm[structured]'")
jsonschema = pytest.importorskip("jsonschema")


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a timezone",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
            },
        },
    },
]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_weather_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), {**WEATHER, "additionalProperties": False})


def _answer_turn(call) -> list[dict]:
    return [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature_c": 21, "sky": "clear"}),
        },
    ]


def test_forced_call_round_trip(slow_client):
    r = slow_client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=FORCE_WEATHER, max_tokens=24, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _check_weather_call(call)
    reply = slow_client.chat.completions.create(
        model=MODEL, messages=QUESTION + _answer_turn(call), tools=TOOLS, max_tokens=12, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    message = reply.choices[0].message
    assert message.content or message.tool_calls


def test_forced_call_streamed_as_tool_call_deltas(slow_client):
    stream = slow_client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=FORCE_WEATHER,
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    parts = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in parts)
    assert len(parts) > 2  # the arguments came in pieces as they were generated
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = slow_client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=FORCE_WEATHER, max_tokens=24, temperature=0
    )
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    # the next turn, streamed: the tool message is accepted and the model answers
    call = whole.choices[0].message.tool_calls[0]
    stream = slow_client.chat.completions.create(
        model=MODEL,
        messages=QUESTION + _answer_turn(call),
        tools=TOOLS,
        tool_choice="none",
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text


def test_required_without_parallel_calls_makes_exactly_one_known_call(slow_client):
    for stream in (False, True):
        kwargs = dict(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=40,
            temperature=0,
        )
        if stream:
            chunks = list(slow_client.chat.completions.create(**kwargs, stream=True))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = slow_client.chat.completions.create(**kwargs)
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0].function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(calls[0].function.arguments), dict)


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tool_requests_are_400(slow_client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        slow_client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param


# ---- rendering: the model's template, HF's `tools` argument ----
# A Qwen2.5-style template (tools listed in the system turn, calls as <tool_call> JSON, results as
# <tool_response> in a user turn), written for this test.
QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' "
    "else 'You are a helpful assistant.' }}\n\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    '{%- for call in message.tool_calls %}<tool_call>\n{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{%- elif not (tools and message.role == 'system') %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
HISTORY = QUESTION + [
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
]


def test_template_with_tools_renders_like_transformers(smollm, hf_smollm_tokenizer):
    from slimlm.server.tools import conversation, plan_tools

    plan = plan_tools(TOOLS, None, None, QWEN_STYLE)
    messages, tools = conversation(HISTORY, plan, QWEN_STYLE)
    ours = smollm.tokenizer.apply_chat_template(messages, tools=tools, chat_template=QWEN_STYLE)
    theirs = hf_smollm_tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=QWEN_STYLE, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert '"arguments": {"city": "Paris"}' in ours  # the arguments string went in as an object
    assert '"name": "get_time"' in ours


def test_template_without_tools_gets_the_hermes_system_prompt(smollm):
    from slimlm.server.tools import conversation, plan_tools

    template = smollm.tokenizer.chat_template
    assert "tools" not in template  # SmolLM2's template ignores tools
    plan = plan_tools(TOOLS, "auto", None, template)
    messages, tools = conversation(HISTORY, plan, template)
    prompt = smollm.tokenizer.apply_chat_template(messages, tools=tools)
    assert tools is None and "<tools>" in prompt and '"name": "get_time"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temperature_c": 21}\n</tool_response>' in prompt


# ---- free-form (auto) parsing per family ----
@pytest.mark.parametrize(
    "template, text, content, calls",
    [
        (
            None,
            'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            "Sure.",
            [("get_weather", {"city": "Oslo"})],
        ),
        (
            None,
            '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>'
            '{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>',
            None,
            [("get_weather", {"city": "A"}), ("get_time", {"tz": "UTC"})],
        ),
        (None, "No tools needed.", "No tools needed.", []),
        (
            None,
            '<tool_call>{"name": "unknown_fn", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "unknown_fn", "arguments": {}}</tool_call>',
            [],
        ),
        (
            "[TOOL_CALLS]",
            '[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "CET"}}]',
            None,
            [("get_time", {"tz": "CET"})],
        ),
        (
            "<|python_tag|>",
            '{"name": "get_weather", "parameters": {"city": "Rome"}}',
            None,
            [("get_weather", {"city": "Rome"})],
        ),
    ],
)
def test_auto_parsing_per_family(template, text, content, calls):
    from slimlm.server.tools import ToolStream, parse_output, plan_tools

    plan = plan_tools(TOOLS, "auto", None, template)
    got_content, got_calls = parse_output(plan, text, "stop")
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    # streamed a few characters at a time: the same content and calls come out
    stream = ToolStream(plan)
    deltas = [d for i in range(0, len(text), 3) for d in stream.feed(text[i : i + 3])]
    last, finish = stream.finish("stop")
    deltas += last
    streamed = "".join(d.get("content") or "" for d in deltas)
    assert streamed.strip() == (content or "").strip()
    assert finish == ("tool_calls" if calls else "stop")
