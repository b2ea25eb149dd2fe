"""Tensor parallelism over torch.distributed with Gloo on CPU."""

import os
import signal
import time

import httpx
import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidParameterError, WorkerDiedError

from tests.conftest import VOCAB
from tests.server_utils import ServerProcess

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"prompt_token_ids": torch.randint(2, VOCAB, (n,), generator=g).tolist()}
        for n in (3, 17, 40)
    ]


def tokens(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate(ps, PARAMS, use_tqdm=False)]


@pytest.mark.parametrize(
    "arch", ["llama3_rope", "qwen2", "mistral"]
)  # 4, 2 and 1 KV heads (the last replicated)
def test_tp2_matches_tp1(tiny_model, arch):
    path = tiny_model(arch)
    ps = prompts()
    expected = tokens(LLM(path, dtype="float32", kv_cache_memory="32MiB"), ps)
    llm = LLM(path, dtype="float32", kv_cache_memory="32MiB", tensor_parallel_size=2)
    try:
        assert tokens(llm, ps) == expected
    finally:
        llm.engine.shutdown()
    assert all(p.poll() is not None for p in llm.engine.workers) or not llm.engine.workers


def test_head_counts_that_do_not_split_are_refused(tiny_model):
    with pytest.raises(InvalidParameterError, match="num_attention_heads"):
        LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="32MiB", tensor_parallel_size=3)


def test_a_killed_worker_is_detected_within_seconds(tiny_model):
    llm = LLM(
        tiny_model("llama3_rope"), dtype="float32", kv_cache_memory="32MiB", tensor_parallel_size=2
    )
    engine = llm.engine
    worker = engine.workers[0]
    tokens(llm, prompts())
    worker.kill()
    worker.wait()
    start = time.monotonic()
    with pytest.raises((WorkerDiedError, RuntimeError)):
        tokens(llm, prompts())
    assert time.monotonic() - start < 10
    engine.shutdown()


def test_server_with_tp2(tiny_model):
    path = tiny_model("llama3_rope")
    expected = LLM(path, dtype="float32", kv_cache_memory="32MiB").generate(
        ["The quick"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    server = ServerProcess(
        path, "--dtype", "float32", "--kv-cache-memory", "32MiB", "--tensor-parallel-size", "2"
    )
    try:
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "The quick", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.json()["choices"][0]["text"] == expected[0].outputs[0].text
        # Kill the worker: the engine fails loudly and /health turns 503.
        import subprocess

        children = subprocess.run(
            ["pgrep", "-f", "tokenmill.worker"], capture_output=True, text=True
        ).stdout.split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(f"{server.url}/health").status_code == 200:
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 503
    finally:
        server.stop()


def test_torchrun_launch_two_ranks(tiny_model):
    """Every rank runs the same command, as on several nodes (MASTER_ADDR/MASTER_PORT set by torchrun)."""
    import subprocess
    import sys

    path = tiny_model("llama3_rope")
    common = [
        "generate",
        "The quick brown",
        "--model",
        path,
        "--dtype",
        "float32",
        "--max-tokens",
        "8",
        "--kv-cache-memory",
        "32MiB",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "tokenmill.cli",
            *common,
            "--tensor-parallel-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and one.stdout.strip() in two.stdout
