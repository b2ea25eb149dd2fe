"""Client faults lose nothing: a client that gives up on a whole response
has its request aborted, and a minute of mixed load with hang-ups and bad
requests leaves no 5xx, no KV block in use and a flat RSS."""

import time

import httpx
import pytest

from bench.soak import soak
from tests.server_utils import ServerProcess, metric


@pytest.fixture(scope="module")
def server(smollm2_path):
    server = ServerProcess(smollm2_path, "--kv-cache-memory", "256MiB", "--max-model-len", "2048")
    yield server
    assert server.stop() == 0


@pytest.mark.slow
def test_a_client_that_gives_up_waiting_has_its_request_aborted(server):
    body = {"prompt": "Count to a thousand:", "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    gone = time.monotonic()
    while metric(server.url, "tokenmill:num_requests_running") > 0:
        assert time.monotonic() - gone < 2.0, "the request outlived its client"
        time.sleep(0.05)
    assert metric(server.url, "tokenmill:kv_cache_usage_perc") == 0.0
    assert metric(server.url, "tokenmill:request_aborted_total") >= 1


@pytest.mark.slow
def test_a_minute_of_mixed_load_leaves_nothing_behind(server):
    summary = soak(server.url, server.proc.pid, duration=60, rate=1.5, interval=20, seed=0)
    assert summary["requests"] > 50
    assert summary["server_errors"] == 0 and summary["bad_requests_refused"]
    assert summary["kv_cache_usage_end"] == 0.0 and summary["running_end"] == 0.0
    # bench/soak.py reports 10 minutes; a minute after a 20 s warm-up only bounds it loosely
    assert summary["rss_growth"] < 0.10
