"""Structured outputs on the default model, judged by the jsonschema package
and Python's json and re: every constrained output parses and validates."""

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.errors import InvalidParameterError
from tokenmill.structured_output import (
    StructuredOutputError,
    bounded_strings_as_patterns,
    choice_grammar,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(max_model_len=1024, kv_cache_memory="256MiB")


def generate(llm, prompts, **kw):
    outs = llm.generate(prompts, SamplingParams(**{"max_tokens": 120, **kw}), use_tqdm=False)
    return [c for o in outs for c in o.outputs]


def test_params_take_exactly_one_constraint():
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams(json=PERSON, regex="a")
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams()
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams(json="{not json")
    assert e.value.param == "structured_outputs.json"
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams(choice=[])
    assert e.value.param == "structured_outputs.choice"
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(structured_outputs={"jsn": {}})
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="a+"))
    assert e.value.param == "ignore_eos"
    # a schema given as text is the same constraint as the dict
    assert (
        StructuredOutputsParams(json=json.dumps(PERSON)).key
        == StructuredOutputsParams(json=PERSON).key
    )


def test_choice_grammar_escapes_quotes_and_control_characters():
    assert choice_grammar(['a"b', "c\\d", "e\nf"]) == 'root ::= "a\\"b" | "c\\\\d" | "e\\x0af"'


def test_length_bounded_strings_admit_no_control_characters(llm):
    schema = {
        "type": "object",
        "properties": {"type": {"type": "string", "minLength": 1, "maxLength": 3}},
        "required": ["type"],
    }
    rewritten = bounded_strings_as_patterns(schema)
    assert rewritten["properties"]["type"] == {"type": "string", "pattern": "^[\\s\\S]{1,3}$"}
    for value in ("a", "abc", "é🙂x", "", "abcd"):  # the pattern keeps the bounds
        valid = jsonschema.Draft202012Validator(schema).is_valid({"type": value})
        assert jsonschema.Draft202012Validator(rewritten).is_valid({"type": value}) == valid
    grammar = llm.engine.inputs.grammars.compile(StructuredOutputsParams(json=schema)).result()
    for text, ok in (
        ('{"type": "ab"}', True),
        ('{"type": "a\x0bb"}', False),
        ('{"type": "a\tb"}', False),
    ):
        matcher = grammar.matcher().matcher
        assert (matcher.accept_string(text) and matcher.is_completed()) == ok, text


@pytest.mark.slow
def test_each_kind_of_constraint_holds(llm):
    prompts = ["Describe a person as JSON:", "Write something:"]
    so = StructuredOutputsParams
    for c in generate(llm, prompts, temperature=0, structured_outputs=so(json=PERSON)):
        jsonschema.validate(json.loads(c.text), PERSON)
        assert c.finish_reason == "stop"
    for c in generate(
        llm, prompts, temperature=0.8, seed=3, n=3, structured_outputs=so(json=PERSON)
    ):
        jsonschema.validate(json.loads(c.text), PERSON)
    for c in generate(llm, prompts, temperature=0, structured_outputs=so(json_object=True)):
        assert isinstance(json.loads(c.text), dict)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for c in generate(llm, prompts, temperature=0.9, seed=1, structured_outputs=so(regex=pattern)):
        assert re.fullmatch(pattern, c.text), c.text
    choices = ["Paris", "London", 'a "quoted" one']
    for c in generate(
        llm, prompts, temperature=1.0, seed=2, n=4, structured_outputs=so(choice=choices)
    ):
        assert c.text in choices
    grammar = 'root ::= ("yes" | "no") " because " [a-z ]{1,20} "."'
    for c in generate(
        llm, prompts, temperature=0.7, seed=4, structured_outputs=so(grammar=grammar)
    ):
        assert re.fullmatch(r"(yes|no) because [a-z ]{1,20}\.", c.text), c.text


@pytest.mark.slow
def test_constraints_meet_stop_strings_logprobs_and_max_tokens(llm):
    spec = StructuredOutputsParams(json=PERSON)
    [c] = generate(llm, ["Person:"], temperature=0, logprobs=2, structured_outputs=spec)
    jsonschema.validate(json.loads(c.text), PERSON)
    assert len(c.logprobs) == len(c.token_ids)
    assert all(c.token_ids[i] in c.logprobs[i] for i in range(len(c.token_ids)))
    [c] = generate(llm, ["Person:"], temperature=0, stop=['"age"'], structured_outputs=spec)
    assert c.finish_reason == "stop" and '"age"' not in c.text
    [c] = generate(llm, ["Person:"], temperature=0, max_tokens=3, structured_outputs=spec)
    assert c.finish_reason == "length" and len(c.token_ids) == 3


@pytest.mark.slow
def test_constraints_survive_preemption_and_prefix_cache_hits(llm):
    """Preempted sequences are recomputed from their tokens and keep their
    matchers; prompts sharing a prefix hit the cache; n > 1 forks matchers."""
    shared = "Here is a list of people described as JSON objects, one per line. " * 4
    prompts = [shared + f"Person {i}:" for i in range(12)]
    spec = StructuredOutputsParams(json=PERSON)
    small = LLM(max_model_len=256, kv_cache_memory=40 * llm.engine.runner.kv_bytes_per_block)
    outs = small.generate(
        prompts,
        SamplingParams(temperature=0.8, seed=9, n=2, max_tokens=80, structured_outputs=spec),
        use_tqdm=False,
    )
    for c in (c for o in outs for c in o.outputs):
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)
        else:  # cut by max_tokens: still a prefix the grammar allows
            assert c.text.startswith("{")
    stats = small.engine.stats()
    assert stats.preemptions > 0 and stats.prefix_hits > 0
    assert stats.num_free_blocks == stats.num_blocks
    stopped = sum(c.finish_reason == "stop" for o in outs for c in o.outputs)
    assert stopped >= 12, "most constrained outputs complete"


@pytest.mark.slow
def test_bad_constraints_are_refused_by_field(llm):
    cases = {
        "structured_outputs.json": {
            "json": {"type": "object", "properties": {"a": {"type": "nope"}}}
        },
        "structured_outputs.regex": {"regex": "[a-"},
        "structured_outputs.grammar": {"grammar": "start: 'lark is not ebnf'"},
    }
    for field, spec in cases.items():
        with pytest.raises(StructuredOutputError) as e:
            generate(llm, ["x"], structured_outputs=StructuredOutputsParams(**spec))
        assert e.value.param == field and "cannot be compiled" in e.value.message
    assert not llm.llm_engine.has_unfinished_requests()


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


def schemas():
    """Object schemas of bounded size (so that a small budget can finish them)."""
    leaf = st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-1000, 1000),
            st.integers(0, 10000),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(
            lambda vals: {"enum": vals},
            st.lists(
                st.text(alphabet="abcxyz", min_size=1, max_size=5),
                min_size=1,
                max_size=4,
                unique=True,
            ),
        ),
    )
    value = st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds(
                lambda items, n: {"type": "array", "items": items, "maxItems": n},
                inner,
                st.integers(0, 3),
            ),
            st.builds(
                lambda props: {"type": "object", "properties": props, "required": sorted(props)},
                st.dictionaries(NAMES, inner, min_size=1, max_size=3),
            ),
        ),
        max_leaves=6,
    )
    return st.builds(
        lambda props, required: {
            "type": "object",
            "properties": props,
            "required": [k for k in sorted(props) if required],
        },
        st.dictionaries(NAMES, value, min_size=1, max_size=4),
        st.booleans(),
    )


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(schemas(), min_size=64, max_size=64))
def test_random_schemas_always_validate(llm, batch):
    """Hypothesis draws batches of schemas; each batch generates in one call."""
    prompts, params = [], []
    for i, schema in enumerate(batch):
        prompts.append(f"JSON object number {i}:")
        params.append(
            SamplingParams(
                temperature=0.8,
                seed=i,
                max_tokens=400,
                structured_outputs=StructuredOutputsParams(json=schema),
            )
        )
    outs = llm.generate(prompts, params, use_tqdm=False)
    for schema, out in zip(batch, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
