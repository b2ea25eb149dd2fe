"""The greedy head picks the token the full logits pick, ties and all."""

import numpy as np
import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.layers.greedy_head import GreedyHead
from tokenmill.layers.linear import linear

from tests.conftest import hf_model


def full_logits_argmax(hidden, weight) -> int:
    """What the engine picks without the greedy head: numpy's first maximum."""
    return int(np.argmax(linear(hidden, weight).float().numpy()[0]))


def heads(dtype, gen):
    v, k = 3000, 72  # k not a multiple of the kernels' 16-wide blocks
    random = torch.randn(v, k, generator=gen) * 0.05
    # Rows that tie with or lie within rounding of others, where a loose bound
    # or a wrong tie-break would pick another row.
    ties = random.clone()
    ties[2000] = ties[10]
    ties[2500] = ties[10] * (1 + 2**-9)
    ties[10:20] = ties[10]
    flat = torch.zeros(v, k)  # every score equal: the first row wins
    # Against a state of ones, row 100 scores 0.5 + 71 * 0.00195 = 0.64 but its
    # int8 copy only 0.5 (its small weights round to zero under the big one's
    # scale), and row 50 scores 0.55 both ways: only the error bound keeps 100.
    coarse = torch.randn(v, k, generator=gen) * 1e-3
    coarse[100] = 0.00195
    coarse[100, 0] = 0.5
    coarse[50] = 0
    coarse[50, 0] = 0.55
    return {
        "random": random.to(dtype),
        "ties": ties.to(dtype),
        "flat": flat.to(dtype),
        "coarse": coarse.to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_head_matches_full_logits(dtype):
    gen = torch.Generator().manual_seed(0)
    for name, weight in heads(dtype, gen).items():
        head = GreedyHead(weight)
        for i in range(60):
            scale = (0.01, 1.0, 30.0)[i % 3]
            hidden = (torch.randn(1, weight.shape[1], generator=gen) * scale).to(dtype)
            if name == "ties" and i % 2:
                hidden = (weight[10].float() * 40).to(dtype)[None]  # rows 10..19 and 2000 tie
            if name == "coarse":
                hidden = torch.full((1, weight.shape[1]), scale, dtype=dtype)
            picked = head(hidden)
            if picked is None:
                pytest.skip(
                    "this CPU has no AVX2 path for the greedy head: the engine takes logits"
                )
            assert picked == full_logits_argmax(hidden, weight), f"{name}, state {i}"


def test_greedy_head_declines_a_non_finite_state():
    weight = torch.randn(100, 32)
    hidden = torch.randn(1, 32)
    hidden[0, 3] = float("nan")
    assert GreedyHead(weight)(hidden) is None


def test_engine_greedy_head_gives_the_full_logits_tokens(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="64MiB")
    runner = llm.engine.runner
    assert runner.greedy_head is not None, "a tiny model's head is most of its weights"
    calls = []
    head = runner.greedy_head
    runner.greedy_head = lambda hidden: calls.append(1) or head(hidden)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[5, 9, 200, 7], [300, 2, 2, 2, 2, 17]]
    with_head = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False) for p in prompts]
    assert len(calls) >= 2 * 23, "single-sequence greedy steps went around the head"
    runner.greedy_head = None
    without = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False) for p in prompts]
    for a, b in zip(with_head, without, strict=True):
        assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


@pytest.mark.slow
def test_smollm2_single_stream_greedy_matches_transformers(smollm2_path):
    """One sequence at a time, so every decode step takes the greedy head."""
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory="512MiB")
    assert llm.engine.runner.greedy_head is not None
    tok = llm.get_tokenizer()
    ref_model = hf_model(smollm2_path)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        ours = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        ids = torch.tensor([tok(prompt).input_ids])
        ref = ref_model.generate(
            ids, max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, ids.shape[1] :]
        assert ours == ref.tolist(), prompt
