"""Structured outputs through the server, judged by the openai SDK's own
parsing and the jsonschema package; fields tokenmill does not implement are
refused by name."""

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_utils import ServerProcess


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int


@pytest.fixture(scope="module")
def server(smollm2_path):
    server = ServerProcess(smollm2_path, "--kv-cache-memory", "128MiB", "--max-model-len", "1024")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def ask(client, content="Give a JSON object with the keys city and country for Paris.", **kw):
    messages = [{"role": "user", "content": content}]
    kw = {"max_tokens": 120, **kw}
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, **kw
    )


@pytest.mark.slow
def test_parse_with_a_pydantic_model_streaming_and_not(client):
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Tell me about Paris."}]
    parsed = client.chat.completions.parse(
        model=model, messages=messages, response_format=City, max_tokens=120, temperature=0
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and parsed.choices[0].finish_reason == "stop"
    with client.chat.completions.stream(
        model=model, messages=messages, response_format=City, max_tokens=120, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == city  # streamed and not: the same greedy output


@pytest.mark.slow
def test_json_object_regex_choice_and_vllm_fields(client):
    # (an open-ended object cut by max_tokens, finish_reason "length", would be no JSON)
    for seed in range(3):
        out = ask(client, response_format={"type": "json_object"}, temperature=0.7, seed=seed)
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    schema = City.model_json_schema()
    out = ask(client, temperature=0.7, seed=5, extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    out = ask(client, temperature=1.0, seed=1, extra_body={"guided_regex": r"[A-Z][a-z]{2,8}!"})
    assert re.fullmatch(r"[A-Z][a-z]{2,8}!", out.choices[0].message.content)
    choices = ["Paris", "Lyon", "Nice"]
    out = ask(client, temperature=1.0, n=4, seed=2, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    out = ask(client, temperature=1.0, extra_body={"structured_outputs": {"choice": choices}})
    assert out.choices[0].message.content in choices
    grammar = 'root ::= "yes" | "no"'
    done = client.completions.create(
        model=client.models.list().data[0].id,
        prompt="Is Paris in France?",
        max_tokens=5,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    assert done.choices[0].text in ("yes", "no")


@pytest.mark.slow
def test_bad_constraints_and_unknown_fields_are_400s_naming_them(client, server):
    cases = {
        "response_format.json_schema.schema": {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "nope"}}},
                },
            }
        },
        "guided_regex": {"extra_body": {"guided_regex": "[a-"}},
        "guided_choice": {
            "extra_body": {"guided_json": {"type": "object"}, "guided_choice": ["a"]}
        },
        "structured_outputs": {"extra_body": {"structured_outputs": {"jsn": {}}}},
        "functions": {"extra_body": {"functions": [{"name": "f"}]}},
        "web_search_options": {"extra_body": {"web_search_options": {}}},
    }
    for field, kw in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, **kw)
        body = e.value.body
        assert body["param"] == field, (field, body)
        assert body["type"] == "BadRequestError" and body["message"]
    assert ask(client, max_tokens=4).choices[0].message.content is not None  # still serving
