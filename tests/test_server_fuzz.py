"""schemathesis against the server's own OpenAPI document: generated
requests, valid and not, never get a 5xx; every 4xx carries the OpenAI error
shape; the server still answers and holds no KV block afterwards."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.server_utils import ServerProcess, metric

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

EXAMPLES = {"POST": 150, "GET": 20}


@pytest.fixture(scope="module")
def server(tiny_model):
    flags = ("--dtype", "float32", "--max-n", "4", "--tool-call-parser", "hermes")
    server = ServerProcess(
        tiny_model("llama"), "--kv-cache-memory", "32MiB", "--max-model-len", "256", *flags
    )
    yield server
    assert server.stop() == 0


def check(case, response) -> None:
    status = response.status_code
    assert status < 500, (status, case.path, repr(case.body)[:1000], response.text[:500])
    if status >= 400 and status != 404:
        error = response.json()["error"]
        assert error["code"] == status and error["message"] and "param" in error
        assert isinstance(error["type"], str)


@pytest.mark.slow
def test_generated_requests_get_no_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    statuses: dict[str, list[int]] = {}
    for op in operations:

        @settings(
            max_examples=EXAMPLES.get(op.method.upper(), 20),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def run(case):
            response = case.call(base_url=server.url, timeout=60)
            check(case, response)
            statuses.setdefault(case.path, []).append(response.status_code)

        run()
    for path in ("/tokenize", "/v1/chat/completions", "/v1/completions"):
        codes = statuses[path]  # a few hundred requests each, some of them served
        assert len(codes) >= 100 and 200 in codes and any(c >= 400 for c in codes), (path, codes)
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "fox", "max_tokens": 2})
    assert ok.status_code == 200
    assert metric(server.url, "tokenmill:kv_cache_usage_perc") == 0.0
