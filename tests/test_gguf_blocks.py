"""GGUF files run from their blocks (gguf_blocks=True) against the same file
dequantized: the layers keep the file's bytes, and 8-bit activations move
next-token predictions little."""

import numpy as np
import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.layers.gguf_linear import GGUFBlocks, GGUFLinear

from bench.common import load_workload


def blocks_of(w: torch.Tensor, ggml_type: int) -> GGUFBlocks:
    gguf = pytest.importorskip("gguf.quants")
    return GGUFBlocks(torch.from_numpy(gguf.quantize(w.numpy(), ggml_type)), ggml_type, w.shape[1])


def random_k_blocks(n: int, k: int, ggml_type: int, seed: int) -> GGUFBlocks:
    """Random K-quant super-blocks (the gguf package cannot quantize to them)
    with small float16 scales."""
    rng = np.random.default_rng(seed)
    size = {12: 144, 13: 176, 14: 210}[ggml_type]
    b = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
    d = lambda: (rng.random((b.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)  # noqa: E731
    if ggml_type == 14:
        b[:, 208:210] = d()
    else:
        b[:, 0:2], b[:, 2:4] = d(), d()
    return GGUFBlocks(torch.from_numpy(b.reshape(n, -1)), ggml_type, k)


def test_merged_layers_keep_a_run_of_blocks_per_type():
    torch.manual_seed(0)
    q, k = torch.randn(64, 256) * 0.1, torch.randn(32, 256) * 0.1
    shards = {
        "same": [blocks_of(q, 3), blocks_of(k, 3)],
        "q5_q8": [blocks_of(q, 6), blocks_of(k, 8)],
        "q4k_q6k": [random_k_blocks(64, 256, 12, 1), random_k_blocks(32, 256, 14, 2)],
        "q4_1_q5_1": [blocks_of(q, 3), blocks_of(k, 7)],  # Q5_1 has no packed form
    }
    layers = {}
    for name, (bq, bk) in shards.items():
        layer = GGUFLinear(256, {"q": 64, "k": 32}, bias=False)
        layer.load_shard("weight", "q", bq)
        layer.load_shard("weight", "k", bk)
        layers[name] = layer
    assert [(r.start, r.size, r.ggml_type) for r in layers["same"].runs] == [(0, 96, 3)]
    assert layers["same"].block_bytes == 96 * 256 // 32 * 20  # the file's bytes
    assert [(r.start, r.size, r.ggml_type) for r in layers["q4k_q6k"].runs] == [
        (0, 64, 12),
        (64, 32, 14),
    ]
    assert all(r.packed for r in layers["q5_q8"].runs) and len(layers["q5_q8"].runs) == 2
    assert not layers["q4_1_q5_1"].runs and layers["q4_1_q5_1"].weight.shape == (96, 256)
    for rows in (1, 40):
        x = torch.randn(rows, 256)
        for name, layer in layers.items():
            ref = torch.cat([b.dequantize() for b in shards[name]]).double()
            want = x.double() @ ref.t()
            # 8-bit activations in the integer products of packed blocks
            tol = 1e-5 if name == "q4_1_q5_1" else 2e-2
            got = layer(x).double()
            assert ((got - want).norm() / want.norm()).item() < tol, (name, rows)


@pytest.mark.slow
def test_default_model_from_its_blocks(smollm2_path):
    ids = load_workload("workload_main.json", 2)[1]["prompt_token_ids"][:400]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    runs = []
    for blocks in (True, False):
        llm = LLM(gguf_blocks=blocks, kv_cache_memory="256MiB", max_model_len=1024,
                  max_num_batched_tokens=16)  # fmt: skip
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        runs.append(out.prompt_logprobs[1:])
        if blocks:
            layers = [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, GGUFLinear)]
            # qkv, o, gate/up and down of 30 layers
            assert len(layers) == 4 * 30 and all(m.runs for m in layers)
            held = sum(m.block_bytes for m in layers)
            assert held < 0.7 * 135e6  # Q4_1: 0.625 bytes a weight
            model = llm.llm_engine.runner.model
            # the Q8_0 table stays blocks, read by lookups and the tied head alike
            assert model.model.embed_tokens.ggml_type == 8
            assert model.lm_head.weight is model.model.embed_tokens.weight
    top = [[max(d, key=lambda t: d[t].logprob) for d in run] for run in runs]
    agreement = np.mean([a == b for a, b in zip(*top, strict=True)])
    drift = np.mean(
        [abs(a[t].logprob - b[t].logprob) for t, a, b in zip(ids[1:], *runs, strict=True)]
    )
    assert agreement >= 0.95, f"top-1 agreement {agreement:.3f}"
    assert drift < 0.2, f"mean |logprob change| of the actual tokens {drift:.3f}"


@pytest.mark.slow
def test_fourteen_bit_activations_track_the_dequantized_weights(smollm2_path):
    """gguf_activation_bits=14 against the same file dequantized, in float32:
    far closer than llama.cpp's 8-bit activations."""
    ids = load_workload("workload_main.json", 2)[1]["prompt_token_ids"][:300]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    runs = {}
    for name, kw in {
        "8": {"gguf_activation_bits": 8},
        "14": {"gguf_activation_bits": 14},
        "dequantized": {"gguf_blocks": False},
    }.items():
        llm = LLM(dtype="float32", kv_cache_memory="128MiB", max_model_len=512, **kw)
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        runs[name] = out.prompt_logprobs[1:]

    def drift(name):
        pairs = zip(ids[1:], runs[name], runs["dequantized"], strict=True)
        return np.mean([abs(a[t].logprob - b[t].logprob) for t, a, b in pairs])

    top = {n: [max(d, key=lambda t: d[t].logprob) for d in run] for n, run in runs.items()}
    agreement = np.mean([a == b for a, b in zip(top["14"], top["dequantized"], strict=True)])
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
    assert drift("14") < drift("8") / 10, (drift("14"), drift("8"))
