"""Speculative decoding with a draft model: a second model proposes the drafts
over a KV cache in the target's blocks, and the target verifies them."""

import json
import shutil

import pytest
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineArgs
from tokenmill.errors import InvalidParameterError

from tests.conftest import finish_drafting_with_aborts, pin_cheap_rows

PROMPTS = [
    [5, 9, 2, 7] * 3,
    list(range(2, 90)),  # a prompt of several blocks
    [3] * 11,
    [8, 1, 4, 60, 61],
    list(range(2, 90)) + [7, 7],  # shares the second's prefix: a prefix-cache hit
]


def _greedy(llm, prompts=PROMPTS, max_tokens=32):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _draft(draft_path, k=4):
    return {"method": "draft_model", "model": draft_path, "num_speculative_tokens": k}


@pytest.mark.parametrize("eager", [True, False])
def test_the_target_as_its_own_draft_is_accepted_and_changes_nothing(tiny_model, eager):
    """The target drafting for itself proposes the target's own greedy tokens,
    so nearly every draft is accepted: a draft KV cache that fell out of step
    with the sequences (rejected drafts, prefix-cache hits, catch-up after steps
    without drafts) would show as rejections. Output equals plain decoding."""
    path = tiny_model("llama")
    plain = LLM(
        path, dtype="float32", kv_cache_memory="64MiB", enforce_eager=eager, speculative_config=None
    )
    want = _greedy(plain)
    llm = LLM(
        path,
        dtype="float32",
        kv_cache_memory="64MiB",
        enforce_eager=eager,
        speculative_config=_draft(path),
    )
    pin_cheap_rows(llm.llm_engine)
    # The draft's cache has the target's blocks, and both fit the budget.
    target, drafter = llm.llm_engine.runner, llm.llm_engine.core.drafter
    assert drafter.runner.num_blocks == target.num_blocks
    both = target.kv_cache.nbytes + drafter.runner.kv_cache.nbytes
    assert 64 * 2**20 - target.kv_bytes_per_block * 2 < both <= 64 * 2**20
    assert _greedy(llm) == want
    st = llm.llm_engine.stats()
    assert st.draft_tokens > 40  # (graphs: at most 3 a step beside 5 sequences)
    assert st.accepted_tokens >= 0.95 * st.draft_tokens, (st.accepted_tokens, st.draft_tokens)
    assert st.num_free_blocks == st.num_blocks


def test_a_different_draft_model_leaves_greedy_output_unchanged(tiny_model):
    """A Qwen3 draft (same vocabulary, other weights) for a Llama target: its
    drafts are mostly wrong, and the output is still the target's alone."""
    target, draft = tiny_model("llama"), tiny_model("qwen3")
    want = _greedy(LLM(target, dtype="float32", kv_cache_memory="64MiB", speculative_config=None))
    llm = LLM(target, dtype="float32", kv_cache_memory="64MiB", speculative_config=_draft(draft))
    pin_cheap_rows(llm.llm_engine)
    assert _greedy(llm) == want
    st = llm.llm_engine.stats()
    assert st.draft_tokens > 0 and st.accepted_tokens < 0.5 * st.draft_tokens


def test_draft_model_steps_survive_preemption_aborts_and_n(tiny_model):
    """A cache small enough to preempt, n = 3, sampling and aborts while a draft
    model drafts: the invariants hold after every step and no block is left."""
    from tokenmill.engine.llm_engine import LLMEngine

    path = tiny_model("llama")
    engine = LLMEngine(
        EngineArgs(
            path,
            dtype="float32",
            kv_cache_memory=80 * 2 * 2 * 2 * 16 * 16 * 4,  # 40 blocks, a draft cache beside them
            max_model_len=256,
            enforce_eager=True,
            speculative_config=_draft(path),
        )
    )
    pin_cheap_rows(engine)
    for i in range(9):
        params = SamplingParams(
            temperature=0 if i % 2 else 0.8,
            n=3 if i % 3 == 0 else 1,
            max_tokens=60,
            seed=i,
            ignore_eos=True,
        )
        engine.add_request(str(i), {"prompt_token_ids": PROMPTS[i % len(PROMPTS)]}, params)
    finish_drafting_with_aborts(engine)


def test_draft_model_config_is_checked_by_name(tiny_model, tmp_path):
    path = tiny_model("llama")
    for value in ({"method": "draft_model"}, {"method": "ngram", "model": path}):
        with pytest.raises(InvalidParameterError, match="draft_model") as e:
            EngineArgs(path, speculative_config=value)
        assert e.value.param == "speculative_config"
    # "model" alone means a draft model, as in vLLM
    assert EngineArgs(path, speculative_config={"model": path}).speculative.method == (
        "draft_model"
    )
    other = tmp_path / "other_vocab"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidParameterError, match="vocabulary") as e:
        LLM(path, dtype="float32", speculative_config=_draft(str(other)))
    assert e.value.param == "speculative_config"
