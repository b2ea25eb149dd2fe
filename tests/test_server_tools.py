"""Tool calls and reasoning through the server, judged by the openai SDK and
jsonschema: arguments always validate against the tool's schema, streamed
deltas concatenate to the unstreamed response, and calls never leak into
content."""

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server_utils import ServerProcess

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "local_time",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
        },
    },
}
# For the random tiny model: its byte tokens can spell overlong UTF-8, which
# xgrammar counts as one character and a decoder as three, so no maxLength.
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            },
            "required": ["city", "hour"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (*TOOLS, ALARM)}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
# A template that takes tools itself (as Hermes and Qwen templates do); it
# fails when the tools do not reach it.
TOOLS_TEMPLATE = (
    "{% if not tools %}{{ raise_exception('no tools') }}{% endif %}"
    "<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def server(smollm2_path):
    flags = ("--tool-call-parser", "hermes", "--enable-auto-tool-choice")
    server = ServerProcess(
        smollm2_path, "--kv-cache-memory", "128MiB", "--max-model-len", "1024", *flags
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(client, messages=ASK, **kw):
    kw = {"max_tokens": 96, "tools": TOOLS, **kw}
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=messages, **kw)


def streamed(client, **kw) -> tuple[str, dict, str]:
    """Content, {index: [name, arguments]} and finish_reason from a stream's deltas."""
    content, calls, finish = "", {}, None
    for chunk in chat(client, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, ["", ""])
            call[0] += d.function.name or ""
            call[1] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


def valid_calls(message) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


@pytest.mark.slow
def test_required_and_named_calls_validate_streamed_or_not(client):
    for seed in range(4):
        kw = dict(tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
        out = chat(client, **kw).choices[0]
        (call,) = valid_calls(out.message)
        assert out.finish_reason == "tool_calls" and out.message.content is None
        content, calls, finish = streamed(client, **kw)
        assert content == "" and finish == "tool_calls"
        assert calls == {0: [call.function.name, call.function.arguments]}
    # n > 1: each choice parses on its own
    out = chat(client, tool_choice="required", parallel_tool_calls=False, n=3, temperature=1.0)
    assert len(out.choices) == 3 and all(len(valid_calls(c.message)) == 1 for c in out.choices)
    named = {"type": "function", "function": {"name": "local_time"}}
    out = chat(client, tool_choice=named, temperature=1.0, seed=7).choices[0]
    assert [c.function.name for c in valid_calls(out.message)] == ["local_time"]
    # parallel calls: every one validates, and the stream lists them alike
    kw = dict(tool_choice="required", temperature=1.0, seed=3, max_tokens=160)
    out = chat(client, **kw).choices[0]
    calls = valid_calls(out.message)
    _, streamed_calls, _ = streamed(client, **kw)
    assert streamed_calls == {
        i: [c.function.name, c.function.arguments] for i, c in enumerate(calls)
    }


@pytest.mark.slow
def test_auto_calls_never_leak_into_content(client):
    for seed in range(6):
        kw = dict(temperature=1.0, seed=seed, tool_choice="auto")
        out = chat(client, **kw).choices[0]
        if out.message.tool_calls:
            valid_calls(out.message)
        assert "<tool_call>" not in (out.message.content or "")
        content, calls, finish = streamed(client, **kw)
        assert content == (out.message.content or "") and finish == out.finish_reason
        assert calls == {
            i: [c.function.name, c.function.arguments]
            for i, c in enumerate(out.message.tool_calls or [])
        }


@pytest.mark.slow
def test_a_conversation_with_tool_results_round_trips(client):
    first = chat(client, tool_choice="required", parallel_tool_calls=False, temperature=0)
    message = first.choices[0].message
    (call,) = valid_calls(message)
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    out = chat(client, messages=history, tool_choice="none", temperature=0).choices[0]
    assert out.message.content and not out.message.tool_calls
    # a template that takes tools gets them (and fails without them)
    out = chat(
        client,
        tool_choice="required",
        temperature=0,
        extra_body={"chat_template": TOOLS_TEMPLATE},
    ).choices[0]
    valid_calls(out.message)
    with pytest.raises(openai.BadRequestError):
        chat(client, tool_choice="none", extra_body={"chat_template": TOOLS_TEMPLATE})


@pytest.mark.slow
def test_bad_tool_requests_are_400s_naming_the_field(client):
    cases = {
        "tool_choice": dict(tools=None, tool_choice="required"),
        "tools": dict(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}},
                    },
                }
            ],
            tool_choice="required",
        ),
        "tools.0.function.name": dict(
            tools=[{"type": "function", "function": {"name": "no spaces"}}]
        ),
        "response_format": dict(tool_choice="required", response_format={"type": "json_object"}),
        "messages.tool_calls.function.arguments": dict(
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{oops"},
                        }
                    ],
                },
            ],
            tool_choice="required",
        ),
    }
    for field, kw in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **kw)
        assert e.value.body["param"] == field, (field, e.value.body)
    assert chat(client, max_tokens=4, tool_choice="none").choices[0].message.content is not None


HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.mark.slow
def test_round_trip_on_a_tiny_model_with_a_hermes_template(tiny_model, tmp_path):
    template = tmp_path / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    flags = ("--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--chat-template")
    server = ServerProcess(
        tiny_model("qwen2"),
        "--kv-cache-memory",
        "32MiB",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        *flags,
        str(template),
    )
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        kw = dict(tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=1)
        # (the tiny tokenizer spends about a token a byte, and its context is 512)
        kw.update(tools=[ALARM], max_tokens=120, messages=[{"role": "user", "content": "Wake"}])

        def tokens(content):
            body = {"messages": [{"role": "user", "content": content}]}
            return httpx.post(f"{server.url}/tokenize", json=body).json()["tokens"]

        first = chat(client, **kw).choices[0]
        (call,) = valid_calls(first.message)
        _, calls, _ = streamed(client, **kw)
        assert calls == {0: [call.function.name, call.function.arguments]}
        history = [
            *kw["messages"],
            first.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "set"},
        ]
        # the final answer: the history (with the call written by the template) fits
        for seed in range(3):
            out = chat(client, messages=history, tool_choice="none", max_tokens=24, seed=seed)
            message = out.choices[0].message
            assert message.content and not message.tool_calls
            # the call and its result are in the prompt
            assert out.usage.prompt_tokens > len(tokens("Wake")) + len(call.function.arguments) // 2
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def thinking_server(smollm2_path):
    flags = ("--reasoning-parser", "deepseek_r1")
    server = ServerProcess(
        smollm2_path, "--kv-cache-memory", "64MiB", "--max-model-len", "512", *flags
    )
    yield server
    assert server.stop() == 0


@pytest.mark.slow
def test_reasoning_content_streamed_and_not(thinking_server):
    client = openai.OpenAI(base_url=f"{thinking_server.url}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    # deepseek_r1: the template opens <think>; this model never closes it, so
    # everything it writes is reasoning
    kw = dict(model=model, messages=ASK, max_tokens=24, temperature=1.0, seed=11)
    message = client.chat.completions.create(**kw).choices[0].message
    assert message.reasoning_content and not message.content
    reasoning = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        assert not delta.content
        reasoning += getattr(delta, "reasoning_content", None) or ""
    assert reasoning == message.reasoning_content
    # without --enable-auto-tool-choice, tools with the default "auto" are refused
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(tools=TOOLS, **kw)
    assert e.value.body["param"] == "tool_choice"
