"""The GPU model runner: decode steps replayed from padded CUDA graphs, the
KV budget from gpu_memory_utilization, and the device choice."""

import itertools

import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.devices import arch_runs_on, resolve_device
from tokenmill.engine.decode_graphs import DecodeGraphs, graph_batch_sizes

from tests.conftest import CUDA_MARKS

PROMPTS = [[5, 9, 2, 7], [3] * 11, [8, 1, 4], list(range(2, 40)), [6, 6]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_graph_batch_sizes_cover_every_batch():
    for top, every_size in itertools.product((1, 5, 16, 100, 256), (False, True)):
        sizes = graph_batch_sizes(top, every_size)
        assert len(sizes) == top if every_size else len(sizes) < top / 8 + 4
        assert sizes == sorted(set(sizes)) and sizes[-1] == top
        assert all(any(s >= n for s in sizes) for n in range(1, top + 1))


def test_padded_decode_batches_give_the_same_tokens(tiny_model):
    """The graph path's padding, replayed eagerly: 5 sequences run as a batch of 8."""
    path = tiny_model("llama")
    plain = LLM(path, dtype="float32", kv_cache_memory="64MiB", enforce_eager=True)
    expected = token_ids(plain.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))
    padded = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    runner = padded.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.device, 8, 16, capture=False)
    calls = []
    run = runner.graphs.run
    runner.graphs.run = lambda step: calls.append(len(step.seq_lens)) or run(step)
    got = token_ids(padded.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))
    assert got == expected
    assert calls and max(calls) == 5, "decode steps did not go through the graph path"


def test_arch_compatibility_rules():
    assert arch_runs_on("80", 8, 6)  # sm_80 code on an 8.6 GPU
    assert arch_runs_on("80", 9, 0)  # through the embedded PTX
    assert not arch_runs_on("80-real", 9, 0)
    assert arch_runs_on("90a", 9, 0) and not arch_runs_on("90a", 10, 0)
    assert not arch_runs_on("89", 8, 0)


def test_cuda_device_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("eager", [True, False])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_gpu_generation_matches_cpu(tiny_model, device, eager):
    path = tiny_model("llama")
    cpu = LLM(path, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    expected = token_ids(cpu.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))
    gpu = LLM(path, dtype="float32", device=device, enforce_eager=eager)
    assert gpu.engine.runner.num_blocks > 0
    assert (gpu.engine.runner.graphs is None) == eager
    got = token_ids(gpu.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))
    assert got == expected


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_gpu_memory_utilization_too_small_is_a_clear_error(tiny_model, device):
    from tokenmill.errors import KVCacheTooSmallError

    with pytest.raises(KVCacheTooSmallError, match="gpu_memory_utilization"):
        LLM(tiny_model("llama"), dtype="float32", device=device, gpu_memory_utilization=1e-4)
