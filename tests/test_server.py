"""The OpenAI-compatible server, driven by the official openai SDK and httpx."""

import asyncio
import json

import httpx
import openai
import pytest
from tokenmill import LLM, SamplingParams

from tests.server_utils import ServerProcess, metric

PROMPTS = ["The quick brown fox", "Héllo wörld", "lazy dog jumps"]


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    path = tiny_model("llama")
    server = ServerProcess(
        path,
        "--kv-cache-memory",
        "32MiB",
        "--max-model-len",
        "256",
        "--max-n",
        "8",
        "--dtype",
        "float32",
    )
    yield server, path
    assert server.stop() == 0, "SIGTERM must end the server with exit code 0"


@pytest.fixture(scope="module")
def client(tiny_server):
    server, _ = tiny_server
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_models_and_health(tiny_server, client):
    server, path = tiny_server
    models = client.models.list()
    assert [m.id for m in models.data] == [path]
    assert client.models.retrieve(path).id == path
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_greedy_completions_match_llm_generate(tiny_server, client):
    server, path = tiny_server
    llm = LLM(path, dtype="float32", kv_cache_memory="32MiB", max_model_len=256)
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    for prompt, exp in zip(PROMPTS, expected, strict=True):
        got = client.completions.create(model=path, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == exp.outputs[0].text
        assert got.choices[0].finish_reason == exp.outputs[0].finish_reason
        assert got.usage.completion_tokens == len(exp.outputs[0].token_ids)
    batch = client.completions.create(model=path, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        e.outputs[0].text for e in expected
    ]
    ids = client.completions.create(
        model=path, prompt=expected[0].prompt_token_ids, max_tokens=12, temperature=0, echo=True
    )
    assert ids.choices[0].text.endswith(expected[0].outputs[0].text)
    stream = client.completions.create(
        model=path, prompt=PROMPTS[1], max_tokens=12, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == PROMPTS[1] + expected[1].outputs[0].text
    # echo with logprobs scores the prompt too: its first token has no logprob
    scored = client.completions.create(
        model=path, prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    n_prompt = len(expected[0].prompt_token_ids)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    ref = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False
    )[0].prompt_logprobs
    ids0 = expected[0].prompt_token_ids
    for pos in range(1, n_prompt):
        assert lp.token_logprobs[pos] == pytest.approx(ref[pos][ids0[pos]].logprob, abs=1e-4)


def test_stream_reassembles_to_the_same_text(tiny_server, client):
    server, path = tiny_server
    full = client.completions.create(model=path, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model=path,
            prompt=PROMPTS[0],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"prompt": "fox", "max_tokens": 3, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_chat_completions_stream_and_logprobs(tiny_server, client):
    server, path = tiny_server
    msgs = [{"role": "user", "content": "The quick brown fox"}]
    full = client.chat.completions.create(
        model=path, messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.logprobs.content) == full.usage.completion_tokens
    for item in choice.logprobs.content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6
    parts = client.chat.completions.create(
        model=path,
        messages=[{"role": "user", "content": [{"type": "text", "text": "The quick brown fox"}]}],
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        == choice.message.content
    )


def test_n_samples_seeded_and_indexed(tiny_server, client):
    server, path = tiny_server
    kw = dict(model=path, prompt="fox", max_tokens=8, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    indices = {
        c.choices[0].index for c in client.completions.create(**kw, stream=True) if c.choices
    }
    assert indices == {0, 1, 2}


BAD_REQUESTS = [
    ("malformed json", b'{"prompt": ', "application/json"),
    ("wrong type", json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), "application/json"),
    ("temperature", json.dumps({"prompt": "x", "temperature": -1}).encode(), "application/json"),
    ("top_p", json.dumps({"prompt": "x", "top_p": 1.5}).encode(), "application/json"),
    (
        "negative max_tokens",
        json.dumps({"prompt": "x", "max_tokens": -1}).encode(),
        "application/json",
    ),
    (
        "huge max_tokens",
        json.dumps({"prompt": "x", "max_tokens": 10**20}).encode(),
        "application/json",
    ),
    ("empty prompt", json.dumps({"prompt": ""}).encode(), "application/json"),
    ("missing prompt", json.dumps({"max_tokens": 3}).encode(), "application/json"),
    ("n above limit", json.dumps({"prompt": "x", "n": 9}).encode(), "application/json"),
    (
        "best_of below n",
        json.dumps({"prompt": "x", "n": 3, "best_of": 2}).encode(),
        "application/json",
    ),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', "application/json"),
    ("prompt too long", json.dumps({"prompt": list(range(5, 300))}).encode(), "application/json"),
    ("token out of vocab", json.dumps({"prompt": [10**6]}).encode(), "application/json"),
    ("10 MB body", json.dumps({"prompt": "x" * (10 << 20)}).encode(), "application/json"),
]


@pytest.mark.parametrize("name,body,ctype", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_error_json_and_server_keeps_serving(tiny_server, name, body, ctype):
    server, path = tiny_server
    r = httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": ctype}, timeout=30
    )
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["code"] == r.status_code and err["message"] and "type" in err
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "fox", "max_tokens": 2, "temperature": 0}
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


# Each names its field: (route, raw JSON, param)
BAD_FIELDS = [
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": Infinity}', "top_p"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"1": -Infinity}}', "logit_bias.1"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"100000": 1}}', "logit_bias"),
    ("/v1/completions", '{"prompt": "x", "stop_token_ids": [100000]}', "stop_token_ids"),
    ("/v1/completions", '{"prompt": "x \\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
        "messages.content",
    ),
    ("/tokenize", '{"prompt": "\\udc00"}', "prompt"),
    ("/detokenize", '{"tokens": [100000]}', "tokens"),
]


@pytest.mark.parametrize("route,body,param", BAD_FIELDS, ids=[b[1] for b in BAD_FIELDS])
def test_bad_values_are_400s_naming_the_field(tiny_server, route, body, param):
    server, _ = tiny_server
    r = httpx.post(
        f"{server.url}{route}", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == param, r.text[:300]


def test_unknown_model_is_404(tiny_server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"


def test_long_prompt_plus_max_tokens_is_capped_not_refused(tiny_server, client):
    server, path = tiny_server
    out = client.completions.create(
        model=path, prompt=list(range(5, 250)), max_tokens=100, temperature=0
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 256 - 245


def test_tokenize_detokenize(tiny_server):
    server, _ = tiny_server
    toks = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"]
    assert text == "The quick brown fox"


def test_concurrent_streams_with_disconnects_free_every_block(tiny_server):
    server, path = tiny_server
    ended_before = {
        name: metric(server.url, f"tokenmill:{name}_total")
        for name in ("request_success", "request_aborted")
    }

    async def one(i: int, client: httpx.AsyncClient) -> str | None:
        # Clients that leave ask for more tokens than they could get before leaving.
        body = {
            "prompt": PROMPTS[i % 3],
            "max_tokens": 200 if i % 4 == 0 else 40,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        text = ""
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if i % 4 == 0 and text:
                    return None  # disconnect mid-stream
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["text"] if chunk["choices"] else ""
        return text

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(i, client) for i in range(64)))

    results = asyncio.run(run())
    completed = [r for i, r in enumerate(results) if i % 4]
    assert len(completed) == 48 and all(completed)
    by_prompt = {}
    for i, r in enumerate(results):
        if r is not None:
            by_prompt.setdefault(i % 3, set()).add(r)
    assert all(len(v) == 1 for v in by_prompt.values()), (
        "greedy outputs differ across concurrent requests"
    )
    for _ in range(50):
        if metric(server.url, "tokenmill:kv_cache_free_blocks") == metric(
            server.url, "tokenmill:kv_cache_total_blocks"
        ):
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(server.url, "tokenmill:kv_cache_free_blocks") == metric(
        server.url, "tokenmill:kv_cache_total_blocks"
    )
    assert metric(server.url, "tokenmill:num_requests_running") == 0
    # A client that leaves may do so after its last token was generated but before it was read:
    # that request ended normally. Every request ends exactly one way, and most leavers abort.
    ended = {
        name: metric(server.url, f"tokenmill:{name}_total") - n for name, n in ended_before.items()
    }
    assert ended["request_success"] + ended["request_aborted"] == 64
    assert 8 <= ended["request_aborted"] <= 16


def test_api_key(tiny_model):
    server = ServerProcess(
        tiny_model("llama"),
        "--kv-cache-memory",
        "16MiB",
        "--max-model-len",
        "128",
        "--api-key",
        "sekret",
    )
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=tiny_model("llama"), prompt="x", max_tokens=2).choices
    finally:
        assert server.stop() == 0


def test_beam_search_completions(tiny_server, client):
    server, path = tiny_server
    llm = LLM(path, dtype="float32", kv_cache_memory="32MiB", max_model_len=256)
    from tokenmill import BeamSearchParams

    beams = llm.beam_search(["The quick"], BeamSearchParams(3, 8), use_tqdm=False)[0].sequences
    prompt_len = len(llm.get_tokenizer()("The quick").input_ids)
    decode = llm.get_tokenizer().decode
    expected = [decode(s.tokens[prompt_len:], skip_special_tokens=True) for s in beams]
    got = client.completions.create(
        model=path,
        prompt="The quick",
        max_tokens=8,
        n=2,
        extra_body={"use_beam_search": True, "best_of": 3},
    )
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected[:2]
    bad = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "x", "use_beam_search": True, "n": 3, "best_of": 2},
    )
    assert bad.status_code == 400
    # a field beam search does not read is refused by name, not ignored
    for field, value in (("temperature", 0.5), ("logprobs", 2), ("stop", ["x"])):
        bad = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "x", "use_beam_search": True, "best_of": 2, field: value},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field
    for body, field in (
        ({"prompt": "x", "length_penalty": 0.5}, "length_penalty"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "stream": True, "echo": True, "logprobs": 1}, "echo"),
    ):
        bad = httpx.post(f"{server.url}/v1/completions", json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field
