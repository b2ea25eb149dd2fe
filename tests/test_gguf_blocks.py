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


def test_merged_layer_of_one_type_keeps_blocks_and_mixed_types_dequantize():
    torch.manual_seed(0)
    q, k = torch.randn(64, 128) * 0.1, torch.randn(32, 128) * 0.1
    same = GGUFLinear(128, {"q": 64, "k": 32}, bias=False)
    same.load_shard("weight", "q", blocks_of(q, 3))
    same.load_shard("weight", "k", blocks_of(k, 3))
    assert same.qweight is not None and same.weight is None and same.ggml_type == 3
    assert same.packed and same.qweight.numel() == (64 + 32) * 128 // 32 * 20  # the file's bytes
    mixed = GGUFLinear(128, {"q": 64, "k": 32}, bias=False)
    mixed.load_shard("weight", "q", blocks_of(q, 3))
    mixed.load_shard("weight", "k", blocks_of(k, 8))
    assert mixed.qweight is None and mixed.weight.shape == (96, 128)
    # Q5_0 shards beside Q8_0 ones take the same values as Q8_0 blocks
    q5_q8 = GGUFLinear(128, {"q": 64, "k": 32}, bias=False)
    q5_q8.load_shard("weight", "q", blocks_of(q, 6))
    q5_q8.load_shard("weight", "k", blocks_of(k, 8))
    assert q5_q8.packed and q5_q8.ggml_type == 8
    refs = {
        "same": torch.cat([blocks_of(q, 3).dequantize(), blocks_of(k, 3).dequantize()]),
        "mixed": torch.cat([blocks_of(q, 3).dequantize(), blocks_of(k, 8).dequantize()]),
        "q5_q8": torch.cat([blocks_of(q, 6).dequantize(), blocks_of(k, 8).dequantize()]),
    }
    for rows in (1, 40):
        x = torch.randn(rows, 128)
        for name, layer in (("same", same), ("mixed", mixed), ("q5_q8", q5_q8)):
            want = x.double() @ refs[name].double().t()
            # 8-bit activations in the integer products of packed blocks
            tol = 1e-5 if name == "mixed" else 2e-2
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
            assert len(layers) == 4 * 30 and all(m.qweight is not None for m in layers)
            held = sum(m.qweight.numel() for m in layers)
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
