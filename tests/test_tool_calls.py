"""Tool-call and reasoning parsing, piece by piece: however the text is cut,
the pieces parse to what the whole text parses to; and the structural tags
accept exactly the calls the tools allow."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.entrypoints.chat import ChatOptions, plan_chat
from tokenmill.entrypoints.protocol import ChatCompletionRequest
from tokenmill.entrypoints.reasoning import ReasoningParser
from tokenmill.entrypoints.tool_calls import (
    TOOL_CALL_FORMATS,
    ToolCallParser,
    structural_tag,
)
from tokenmill.errors import InvalidParameterError

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
CLOCK = {"name": "now", "parameters": {"type": "object", "properties": {}}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
free_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)


def parse(parser, pieces):
    """Content, per-call (name, arguments) from the deltas, and the parser's calls."""
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, deltas = parser.feed(piece, final=i == len(pieces) - 1)
        content += text
        for d in deltas:
            name, args = calls.get(d.index, ("", ""))
            assert d.id is None or name == "", "a call's id comes once, with its name"
            calls[d.index] = (name + (d.name or ""), args + d.arguments)
    return content, calls, [(c.name, c.arguments) for c in parser.calls]


def cut(text, points):
    points = sorted({p % (len(text) + 1) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(sorted(TOOL_CALL_FORMATS)),
    before=free_text,
    calls=st.lists(
        st.tuples(
            st.sampled_from(["get_weather", "now", "a.b-c_1"]),
            st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        ),
        max_size=3,
    ),
    after=free_text,
    points=st.lists(st.integers(0, 10_000), max_size=40),
    truncate=st.integers(0, 400),
)
def test_any_cut_parses_like_the_whole_text(fmt, before, calls, after, points, truncate):
    fmt = TOOL_CALL_FORMATS[fmt]
    written = [(name, json.dumps(args)) for name, args in calls]
    text = before + "".join(fmt.write(n, a) for n, a in written) + (after if calls else "")
    whole = parse(ToolCallParser(fmt), [text])
    assert parse(ToolCallParser(fmt), cut(text, points)) == whole
    content, deltas, parsed = whole
    if fmt.trigger not in before + after:
        # every call comes back exactly, its arguments as written, in order
        assert parsed == written
        assert [deltas[i] for i in range(len(written))] == written
        assert fmt.trigger not in content
    # cut short anywhere (max_tokens), the pieces still agree with the whole
    short = text[:truncate]
    assert parse(ToolCallParser(fmt), cut(short, points)) == parse(ToolCallParser(fmt), [short])


@pytest.mark.parametrize("name", sorted(TOOL_CALL_FORMATS))
def test_every_byte_boundary_parses_like_the_whole_text(name):
    fmt = TOOL_CALL_FORMATS[name]
    text = (
        "Let me look. "
        + fmt.write("get_weather", '{"city": "Zürich \\"HB\\" {x}", "days": [1, {"a": null}]}')
        + "\n"
        + fmt.write("now", "{}")
        + " Done 🙂"
    )
    whole = parse(ToolCallParser(fmt), [text])
    assert whole[2] == [
        ("get_weather", '{"city": "Zürich \\"HB\\" {x}", "days": [1, {"a": null}]}'),
        ("now", "{}"),
    ]
    raw = text.encode()
    for k in range(len(raw) + 1):  # a cut inside a character waits for the rest of it
        head = raw[:k].decode(errors="ignore")
        assert parse(ToolCallParser(fmt), [head, text[len(head) :]]) == whole
    assert parse(ToolCallParser(fmt), list(text)) == whole


def test_text_that_only_looks_like_a_call_stays_content():
    fmt = TOOL_CALL_FORMATS["hermes"]
    for text in [
        "a <tool_call> b",
        '<tool_call>\n{"nam',
        "x <tool_c",
        '<tool_call>\n{"name": "a"}',
    ]:
        content, deltas, calls = parse(ToolCallParser(fmt), [text])
        assert (content, deltas, calls) == (text, {}, [])
    # whitespace around calls is not content; text around them is
    text = "Sure.\n" + fmt.write("now", "{}") + "\n" + fmt.write("now", '{"a": 1}') + "\n"
    assert parse(ToolCallParser(fmt), [text]) == (
        "Sure.",
        {0: ("now", "{}"), 1: ("now", '{"a": 1}')},
        [("now", "{}"), ("now", '{"a": 1}')],
    )


def test_mistral_lists_several_calls_in_one_block():
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"x": "}]"}}, {"name": "b", "arguments": {}}]'
    _, _, calls = parse(ToolCallParser(TOOL_CALL_FORMATS["mistral"]), [text])
    assert calls == [("a", '{"x": "}]"}'), ("b", "{}")]


@settings(max_examples=200, deadline=None)
@given(
    opened=st.booleans(),
    thinking=free_text,
    answer=free_text,
    closed=st.booleans(),
    points=st.lists(st.integers(0, 1000), max_size=20),
)
def test_reasoning_splits_alike_however_cut(opened, thinking, answer, closed, points):
    text = ("" if opened else "<think>") + thinking + ("</think>\n\n" + answer if closed else "")

    def run(pieces):
        p, out = ReasoningParser(opened), ("", "")
        for i, piece in enumerate(pieces):
            r, c = p.feed(piece, final=i == len(pieces) - 1)
            out = (out[0] + r, out[1] + c)
        return out

    whole = run([text])
    assert run(cut(text, points)) == whole
    if "<think>" not in thinking and "</think>" not in thinking:
        assert whole == (thinking, answer.lstrip() if closed else "")


@pytest.fixture(scope="module")
def grammars(smollm2_path):
    from tokenmill.loader.tokenizer import load_tokenizer
    from tokenmill.structured_output import GrammarCompiler

    tok = load_tokenizer(smollm2_path)
    return GrammarCompiler(tok, 49152, [tok.eos_token_id])


def accepts(grammars, tag, text) -> bool:
    from tokenmill.sampling_params import StructuredOutputsParams

    matcher = grammars.compile(StructuredOutputsParams(structural_tag=tag)).result().matcher()
    return matcher.matcher.accept_string(text) and matcher.matcher.is_completed()


@pytest.mark.parametrize("name", sorted(TOOL_CALL_FORMATS))
def test_structural_tags_admit_valid_calls_only(grammars, name):
    fmt = TOOL_CALL_FORMATS[name]
    tools = [WEATHER, CLOCK]
    good = fmt.write("get_weather", '{"city": "Paris", "days": 3}')
    bad_args = fmt.write("get_weather", '{"days": 3}')  # city is required
    bad_name = fmt.write("get_time", "{}")
    required = structural_tag(fmt, tools, "required", parallel=True)
    assert accepts(grammars, required, good)
    assert accepts(grammars, required, good + "\n" + fmt.write("now", "{}"))
    assert not accepts(grammars, required, "")  # at least one call
    assert not accepts(grammars, required, "Sure. " + good)  # calls only
    assert not accepts(grammars, required, bad_args)
    assert not accepts(grammars, required, bad_name)
    single = structural_tag(fmt, tools, "required", parallel=False)
    assert not accepts(grammars, single, good + "\n" + fmt.write("now", "{}"))
    auto = structural_tag(fmt, tools, "auto", parallel=True)
    assert accepts(grammars, auto, "No call needed.")
    assert accepts(grammars, auto, "Let me check. " + good)
    assert not accepts(grammars, auto, "Let me check. " + bad_args)
    named = structural_tag(fmt, tools, "now", parallel=True)
    assert accepts(grammars, named, fmt.write("now", "{}"))
    assert not accepts(grammars, named, good)


def request(**kw):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


TOOLS = [{"type": "function", "function": WEATHER}]


def test_tool_choice_is_checked_against_tools_and_server_options():
    auto = ChatOptions("hermes", enable_auto_tool_choice=True)
    cases = [
        (request(tool_choice="required"), ChatOptions(), "tool_choice"),
        (request(tools=TOOLS), ChatOptions(), "tool_choice"),  # auto is the default
        (
            request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "f"}}),
            auto,
            "tool_choice",
        ),
        (
            request(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
            auto,
            "response_format",
        ),
        (request(tools=TOOLS, chat_template_kwargs={"tools": []}), auto, "chat_template_kwargs"),
    ]
    for req, options, param in cases:
        with pytest.raises(InvalidParameterError) as e:
            plan_chat(req, options, None)
        assert e.value.param == param
    with pytest.raises(ValueError, match="tool-call-parser"):
        ChatOptions(enable_auto_tool_choice=True)
    # "none" sends no tools and parses none
    plan = plan_chat(request(tools=TOOLS, tool_choice="none"), ChatOptions(), "{{ tools }}")
    assert (
        plan.constraint is None and plan.tool_format is None and "tools" not in plan.template_kwargs
    )


def test_tools_reach_the_template_or_the_system_message():
    req = request(tools=TOOLS, tool_choice="required")
    plan = plan_chat(req, ChatOptions(), "{% for t in tools %}{{ t }}{% endfor %}")
    assert plan.template_kwargs["tools"] == TOOLS
    assert plan.messages == [{"role": "user", "content": "hi"}]
    plan = plan_chat(req, ChatOptions(), "{{ messages }}")  # a template without tools
    assert "tools" not in plan.template_kwargs
    assert plan.messages[0]["role"] == "system" and '"get_weather"' in plan.messages[0]["content"]
    # earlier calls are written into their message in the parser's format
    history = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
        ],
        tools=TOOLS,
        tool_choice="required",
    )
    plan = plan_chat(history, ChatOptions("llama3_json"), None)
    assert plan.messages[2]["content"] == '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert plan.messages[3] == {"role": "tool", "content": "-3 C", "tool_call_id": "c1"}
    # a template that takes tools gets the arguments as objects
    plan = plan_chat(history, ChatOptions(), "tools")
    assert plan.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_llm_chat_hands_tools_and_template_kwargs_to_the_template(tiny_model):
    from tokenmill import LLM, SamplingParams

    llm = LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="16MiB", max_model_len=256)
    template = "{% for t in tools %}{{ t.function.name }};{% endfor %}{{ greeting }}"
    tools = [{"type": "function", "function": WEATHER}]
    ids = llm.apply_chat_template([], template, tools=tools, greeting="The")
    assert llm.get_tokenizer().decode(ids) == "get_weather;The"
    [out] = llm.chat(
        [{"role": "user", "content": "x"}],
        SamplingParams(max_tokens=2),
        use_tqdm=False,
        chat_template=template,
        tools=tools,
        chat_template_kwargs={"greeting": "The"},
    )
    assert out.prompt_token_ids == ids
