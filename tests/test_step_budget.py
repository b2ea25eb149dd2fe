"""Scheduling against a step-time budget: with a cost model of the step, no
step that holds decode rows exceeds the budget while prompts wait to fill,
every request still finishes, and the block accounting holds."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill import _core

FIXED_MS, PER_PROMPT_TOKEN_MS, PER_DECODE_ROW_MS = 3.0, 0.2, 0.9


def decode_rows(plan, sampled: set[int]) -> int:
    """Sequences of the plan that have sampled before (a one-token chunk of
    a prompt also has one token to compute, but is prefill)."""
    return sum(seq in sampled for seq in plan.seq_ids)


def synthetic_ms(plan, rows: int) -> float:
    return FIXED_MS + PER_PROMPT_TOKEN_MS * (plan.num_tokens - rows) + PER_DECODE_ROW_MS * rows


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    max_tokens=st.lists(st.integers(1, 40), min_size=12, max_size=12),
    budget_ms=st.floats(10, 80),
    arrivals=st.lists(st.integers(0, 30), min_size=12, max_size=12),
    shared=st.integers(0, 64),
)
def test_no_decode_step_exceeds_the_budget_and_everything_finishes(
    prompts, max_tokens, budget_ms, arrivals, shared
):
    c = _core.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs = 400, 8, 16
    c.max_num_batched_tokens, c.max_model_len, c.max_step_ms = 512, 512, budget_ms
    c.aging_steps = 1 << 30  # no aging: the target holds exactly (aging: a GoogleTest)
    s = _core.Scheduler(c)
    for i in range(12):  # a warm-up of measured steps of varied sizes
        tokens, rows = 37 * i, i % 5
        ms = FIXED_MS + PER_PROMPT_TOKEN_MS * tokens + PER_DECODE_ROW_MS * rows
        s.observe_step(tokens, rows, ms)
    prefix = list(range(5000, 5000 + shared))  # a shared prefix: prefix-cache hits
    pending = sorted(zip(arrivals, range(len(prompts)), strict=False))
    finished: set[int] = set()
    sampled: set[int] = set()
    for step in range(3000):
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            p = _core.RequestParams()
            p.max_tokens, p.ignore_eos = max_tokens[i], True
            s.add_request(i, prefix + [100 + i] * prompts[i], p)
        if not s.has_unfinished() and not pending:
            break
        plan = s.schedule()
        decodes = decode_rows(plan, sampled)
        prefill = plan.num_tokens - decodes
        if decodes and prefill > c.block_size:
            # (within a token's cost: the fit is exact only up to rounding)
            ms = synthetic_ms(plan, decodes)
            assert ms <= budget_ms + PER_PROMPT_TOKEN_MS, (plan.num_tokens, decodes)
        tokens = np.full(sum(plan.num_samples), 7, dtype=np.int32)
        result = s.update(plan, tokens)
        s.check_invariants()
        finished.update(result.finished_requests)
        sampled.update(seq for seq, n in zip(plan.seq_ids, plan.num_samples, strict=True) if n)
        if plan.num_seqs:
            s.observe_step(plan.num_tokens - decodes, decodes, synthetic_ms(plan, decodes))
    assert finished == set(range(len(prompts)))
    assert s.stats().num_free_blocks == c.num_blocks


@pytest.mark.slow
def test_a_long_prompt_does_not_stall_running_streams(smollm2_path):
    """On the default model: streams decode while a 1,500-token prompt
    arrives; with a 100 ms target, no step while it fills comes near the
    second or more its prefill takes in one piece."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(kv_cache_memory="256MiB", max_model_len=2048, max_itl_ms=100)
    engine = llm.llm_engine
    for i in range(4):
        params = SamplingParams(max_tokens=120, ignore_eos=True, temperature=0)
        engine.add_request(f"s{i}", f"Story {i}: once upon a time", params)
    for _ in range(20):  # the streams decode; the cost model fits
        engine.step()
    long_prompt = {
        "prompt_token_ids": [int(t) for t in np.random.default_rng(0).integers(100, 40000, 1500)]
    }
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    gaps, done = [], False
    while not done:
        t0 = time.perf_counter()
        outs = engine.step()
        gaps.append(time.perf_counter() - t0)
        done = any(o.request_id == "long" and o.finished for o in outs)
    assert len(gaps) >= 4, "the prompt filled in one step"
    assert max(gaps) < 0.4, f"a step took {max(gaps):.2f} s beside the streams"
