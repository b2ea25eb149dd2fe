"""tokenmill's models against transformers, the reference."""

import numpy as np
import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.engine.batch import StepInputs
from tokenmill.errors import UnsupportedModelError

from tests.conftest import TINY_CONFIGS, VOCAB, hf_model

# phi3_long differs from transformers for sequences within its original context (test below).
ARCHS = [a for a in TINY_CONFIGS if a != "phi3_long"]


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def prefill_logits(llm: LLM, prompts):
    """Logits at every prompt position, from one mixed batch through the engine's runner."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, SamplingParams(max_tokens=1))
    out = engine.core.scheduler.schedule()
    assert out.num_tokens == sum(map(len, prompts)), "prefill did not fit in one step"
    logits = engine.runner.logits(StepInputs.from_plan(out, np.arange(out.num_tokens)))
    for i in range(len(prompts)):
        engine.abort_request(f"p{i}")
    bounds = out.query_start_loc
    return [logits[bounds[i] : bounds[i + 1]] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    prompts = prompts_of([5, 16, 17, 40, 1])
    ours = prefill_logits(llm, prompts)
    ref_model = hf_model(path)
    for p, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0]
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-4, f"{arch}: relative logit error {err:.2e}"


@pytest.mark.parametrize("budget", [2048, 8])  # one step, and chunked prefill
def test_prompt_logprobs_match_transformers(tiny_model, budget):
    path = tiny_model("llama")
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=budget)
    prompts = prompts_of([2, 19, 30], seed=3)
    llm.generate([{"prompt_token_ids": prompts[2]}], SamplingParams(max_tokens=1))  # cache it
    params = SamplingParams(max_tokens=2, n=2, temperature=1.0, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref_model = hf_model(path)
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0].log_softmax(-1)
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(p) and got[0] is None
        for pos in range(1, len(p)):
            entry, want = got[pos], ref[pos - 1]
            assert entry[p[pos]].logprob == pytest.approx(want[p[pos]].item(), abs=1e-4)
            assert entry[p[pos]].rank == int((want > want[p[pos]]).sum()) + 1
            top = want.topk(3).indices.tolist()
            assert set(top) <= set(entry), "the top-3 tokens are missing"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    prompts = prompts_of([3, 20, 33], seed=1)
    # min_tokens masks EOS exactly as transformers' min_new_tokens does
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref_model = hf_model(path)
    for p, out in zip(prompts, outs, strict=True):
        ref = ref_model.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=1
        )[0, len(p) :].tolist()
        assert out.outputs[0].token_ids == ref


def test_longrope_long_context_matches_transformers(tiny_model):
    """With max_model_len past the original context, every position takes
    the long factors: what transformers does for sequences that long."""
    path = tiny_model("phi3_long")
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    prompts = prompts_of([17, 40, 70], seed=2)
    ref_model = hf_model(path)
    for p, got in zip(prompts, prefill_logits(llm, prompts), strict=True):
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0]
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    out = llm.generate([{"prompt_token_ids": prompts[1]}], params, use_tqdm=False)[0]
    ref = ref_model.generate(
        torch.tensor([prompts[1]]), max_new_tokens=24, do_sample=False, min_new_tokens=24
    )[0, len(prompts[1]) :]
    assert out.outputs[0].token_ids == ref.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_same_tokens_alone_batched_chunked_preempted_and_cached(tiny_model, arch):
    path = tiny_model("phi3_long" if arch == "phi3" else arch)  # phi3's context is 64
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    target = prompts_of([70], seed=5)[0]
    others = prompts_of([30 + i for i in range(63)], seed=6)
    alone = LLM(path, dtype="float32", kv_cache_memory="64MiB").generate(
        [target], params, use_tqdm=False
    )
    expected = alone[0].outputs[0].token_ids

    batched = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    got = batched.generate([target, *others], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == expected

    chunked = LLM(path, dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=16)
    assert chunked.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids == expected

    # A cache of 40 blocks x 16 tokens cannot hold 64 sequences of ~60 tokens: preemption.
    small = LLM(
        path, dtype="float32", kv_cache_memory=40 * small_block_bytes(batched), max_model_len=512
    )
    got = small.generate([target, *others], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == expected
    assert small.engine.stats().preemptions > 0
    assert small.engine.stats().num_free_blocks == small.engine.runner.num_blocks

    # Prefix-cache hit: the same prompt again reuses its full blocks.
    cached = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    cached.generate([target], params, use_tqdm=False)
    hits_before = cached.engine.stats().prefix_hits
    assert cached.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert cached.engine.stats().prefix_hits > hits_before


def small_block_bytes(llm):
    return llm.engine.runner.kv_bytes_per_block


def test_unsupported_architecture_is_a_clear_error(tiny_model, tmp_path):
    import json
    import shutil

    path = tmp_path / "odd"
    shutil.copytree(tiny_model("llama"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        LLM(str(path))


SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\n",
    "Water boils at a temperature of",
    "The largest planet in the solar system",
]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_path):
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory="512MiB")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = llm.generate(SMOL_PROMPTS, params, use_tqdm=False)
    tok = llm.get_tokenizer()
    ref_model = hf_model(smollm2_path)
    ids = [tok(p).input_ids for p in SMOL_PROMPTS]
    width = max(map(len, ids))
    batch = torch.tensor([[tok.pad_token_id or 0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    ref = ref_model.generate(
        batch,
        attention_mask=mask,
        max_new_tokens=64,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[:, width:]
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == ref[i].tolist(), f"prompt {i}: {SMOL_PROMPTS[i]!r}"
