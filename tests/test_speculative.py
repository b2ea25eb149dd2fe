"""Speculative decoding: n-gram drafts verified in the step that decodes.

Greedy output is token-identical to decoding without drafts; sampled output
keeps the target distribution; rejected drafts leave no block behind."""

import gc
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill import _core
from tokenmill.config import EngineArgs, SpeculativeConfig
from tokenmill.errors import InvalidParameterError

from tests.conftest import finish_drafting_with_aborts, hf_model


@pytest.mark.parametrize(
    "value, field",
    [
        ('{"method": "eagle"}', "method 'eagle'"),
        ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup_min"),
        ('{"model": "x", "draft_tensor_parallel_size": 2}', "draft_tensor_parallel_size"),
        ("{not json", "not JSON"),
    ],
)
def test_speculative_config_refuses_what_it_cannot_do_by_name(value, field):
    with pytest.raises(InvalidParameterError, match=field):
        EngineArgs(speculative_config=value)


def test_speculative_config_takes_vllm_keys_as_json_or_dict():
    text = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'
    assert EngineArgs(speculative_config=text).speculative == SpeculativeConfig("ngram", 3, 5, 2)
    assert (
        EngineArgs(
            speculative_config={"num_speculative_tokens": 4}
        ).speculative.num_speculative_tokens
        == 4
    )
    assert EngineArgs().speculative_config == "auto"  # the engine picks by device
    assert EngineArgs(speculative_config="off").speculative is None


@settings(max_examples=80, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=60), min_size=1, max_size=8),
    ns=st.lists(st.integers(1, 3), min_size=8, max_size=8),
    max_tokens=st.lists(st.integers(1, 30), min_size=8, max_size=8),
    num_blocks=st.integers(24, 60),
    seed=st.integers(0, 2**16),
)
def test_drafts_keep_the_block_accounting(prompts, ns, max_tokens, num_blocks, seed):
    """Random workloads over a small alphabet (so drafts are proposed often)
    and a small cache (so requests are preempted): every step a random
    prefix of each draft is accepted, some requests are aborted mid-way;
    the invariants hold after every step, each sequence holds exactly the
    tokens it was given, and no block is left in use."""
    rng = np.random.default_rng(seed)
    c = _core.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs = num_blocks, 4, 8
    c.max_num_batched_tokens, c.max_model_len = 64, 96
    c.speculative.num_tokens, c.speculative.min_ngram, c.speculative.max_ngram = 5, 1, 3
    s = _core.Scheduler(c)
    expected: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        p = _core.RequestParams()
        p.max_tokens, p.n, p.eos_token_id = max_tokens[i], ns[i], 4
        try:
            first = s.add_request(i, prompt, p)
        except ValueError:
            continue  # does not fit this cache
        expected[first] = list(prompt)
    verified = 0
    for _ in range(2000):
        if not s.has_unfinished():
            break
        plan = s.schedule()
        tokens, counts = [], []
        for i in range(plan.num_seqs):
            k, d = int(plan.num_samples[i]), int(plan.num_draft[i])
            if d:
                start = int(plan.query_start_loc[i]) + 1
                draft = plan.input_ids[start : start + d].tolist()
                accepted = int(rng.integers(0, d + 1))
                toks = draft[:accepted] + [int(rng.integers(0, 5))]
                verified += d
            else:
                toks = [int(t) for t in rng.integers(0, 5, size=k)]
            tokens += toks
            counts.append(len(toks))
        result = s.update(plan, np.asarray(tokens, np.int32), np.asarray(counts, np.int32))
        for e in result.events:
            if e.kind == _core.EventKind.FORKED:
                expected[e.seq_id] = list(expected[e.parent])
            elif e.kind == _core.EventKind.APPENDED:
                expected[e.seq_id].append(e.token)
        for e in result.events:
            if e.kind == _core.EventKind.APPENDED and s.has_request(e.request_id):
                held = s.seq_tokens(e.seq_id)
                assert not held or held == expected[e.seq_id]
        if rng.random() < 0.03 and plan.num_seqs:
            s.abort_request(int(plan.request_ids[0]))
        s.check_invariants()
    assert not s.has_unfinished()
    assert s.stats().num_free_blocks == c.num_blocks
    assert s.stats().draft_tokens == verified


# the default model with a KV cache that fits beside the rest of the suite
SMALL = dict(kv_cache_memory="2GiB", max_model_len=2048)


def _generate(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _copy_and_free_prompts(tokenizer, n: int) -> list[list[int]]:
    """Half ask to repeat a passage (drafts are mostly right), half to write
    freely (mostly wrong)."""
    passages = [
        "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
        "In 1869 the first transcontinental railroad in the United States was completed.",
        "Water boils at one hundred degrees Celsius at sea level and at lower heat on mountains.",
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
    ]
    topics = ["the sea", "a city at night", "how bread is made", "the history of chess"]
    prompts = []
    for i in range(n):
        if i % 2:
            text = f"Repeat the following text exactly, twice.\n\n{passages[i // 2 % 4]}\n\n"
        else:
            text = f"Write a short story about {topics[i // 2 % 4]}."
        messages = [{"role": "user", "content": text}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return [p if isinstance(p, list) else p["input_ids"] for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, method",
    [("bfloat16", "ngram"), ("float32", "ngram"), ("bfloat16", "suffix"), ("bfloat16", "draft")],
)
def test_greedy_output_is_token_identical(dtype, method):
    """The default model, 16 prompts x 128 tokens, alone and batched: the
    same tokens with and without drafts (n-gram; suffix decoding, whose
    tree the first requests fill for the later ones; the model drafting for
    itself, whose single-row greedy head reads int8 weights), and drafts were
    verified and accepted."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.loader.hf import default_model_path

    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    plain = LLM(dtype=dtype, speculative_config=None, **SMALL)
    prompts = _copy_and_free_prompts(plain.get_tokenizer(), 16)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    want = _generate(plain, inputs, params)
    del plain
    gc.collect()  # (an engine holds reference cycles: free its KV cache now)
    config = {"method": method, "num_speculative_tokens": 5}
    if method == "draft":
        config = {**config, "method": "draft_model", "model": default_model_path()}
    spec = LLM(dtype=dtype, speculative_config=config, **SMALL)
    alone = [_generate(spec, [x], params)[0] for x in inputs[:4]]
    stats = spec.llm_engine.stats()
    assert stats.accepted_tokens > 0 and stats.draft_tokens >= stats.accepted_tokens
    batched = _generate(spec, inputs, params)
    assert alone == want[:4]
    assert batched == want


def test_sampling_keeps_the_target_distribution(tiny_model):
    """Temperature sampling with drafts. After the first token 7 the prompt's
    n-gram proposes 8; the second token comes from the verification row of
    the real token and the third, when the second drew the draft, from the
    draft's row. Each follows the model's own probabilities (transformers,
    float64) by a chi-square test."""
    from tokenmill import LLM, SamplingParams

    path = tiny_model("llama")
    model = hf_model(path, torch.float64)
    prompt = [5, 6, 7, 8, 9, 5, 6]
    temperature = 1.0

    @torch.no_grad()
    def probs(ids, bias):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        for t, b in bias.items():
            logits[t] += b
        return (logits / temperature).softmax(-1).numpy()

    def half(p, token):  # the bias that gives `token` half the mass
        return float(np.log((1 - p[token]) / p[token]) * temperature)

    # the draft is drawn often: 7 first, then 8, each with probability 1/2
    b7 = half(probs(prompt, {}), 7)
    bias = {7: b7, 8: half(probs(prompt + [7], {7: b7}), 8)}

    llm = LLM(
        path,
        dtype="float32",
        max_num_seqs=16,  # batches small enough that drafts pay
        enforce_eager=True,  # (graphs would bound a step's drafts to their size)
        speculative_config={"num_speculative_tokens": 5, "prompt_lookup_min": 2},
    )
    params = SamplingParams(temperature=temperature, max_tokens=3, logit_bias=bias, ignore_eos=True)
    requests = [{"prompt_token_ids": prompt}] * 4000
    outs = np.array(
        [o.outputs[0].token_ids for o in llm.generate(requests, params, use_tqdm=False)]
    )
    assert llm.llm_engine.stats().accepted_tokens > 0
    after_7 = outs[outs[:, 0] == 7]
    after_7_8 = after_7[after_7[:, 1] == 8]
    assert len(after_7_8) > 500

    def chi2(samples, p):
        top = np.argsort(p)[::-1][:7]  # the likeliest tokens, the rest pooled
        counts = np.array([(samples == t).sum() for t in top] + [(~np.isin(samples, top)).sum()])
        expected = len(samples) * np.append(p[top], 1 - p[top].sum())
        return ((counts - expected) ** 2 / expected).sum()

    assert chi2(outs[:, 0], probs(prompt, bias)) < 24.3  # p = 0.001 at 7 degrees of freedom
    assert chi2(after_7[:, 1], probs(prompt + [7], bias)) < 24.3
    assert chi2(after_7_8[:, 2], probs(prompt + [7, 8], bias)) < 24.3


def test_preemption_aborts_and_n_in_speculative_steps_leave_no_block(tiny_model):
    """A cache small enough to preempt, n = 3, and requests aborted between
    steps, all while drafts are verified: the invariants hold after every
    step and the cache is empty at the end."""
    from tokenmill import SamplingParams
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineArgs(
            tiny_model("llama"),
            dtype="float32",
            kv_cache_memory=60 * 2 * 2 * 2 * 16 * 16 * 4,
            max_model_len=256,
            enforce_eager=True,  # (graphs would bound a step's drafts to their size)
            speculative_config={"num_speculative_tokens": 4, "prompt_lookup_min": 1},
        )
    )
    repeat = [list(range(10, 20)) * 4, [30, 31, 32] * 10, list(range(40, 60)) * 2]
    for i in range(9):
        # every other request is pushed to repeat one token, so that its
        # drafts are accepted; the others' are mostly rejected
        params = SamplingParams(
            temperature=0 if i % 2 else 0.8,
            n=3 if i % 3 == 0 else 1,
            max_tokens=60,
            seed=i,
            ignore_eos=True,
            logit_bias={50 + i: 30.0} if i % 2 == 0 else None,
        )
        engine.add_request(str(i), {"prompt_token_ids": repeat[i % 3]}, params)
    finish_drafting_with_aborts(engine)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_needle_gets_the_same_logprobs_in_any_batch(dtype):
    """The default model with chunked prefill and prefix caching on: a
    prompt alone, then at a random place among 64 random prompts (a batch
    whose prefill is chunked across steps), then with drafts; greedy tokens
    and their logprobs are bitwise the same."""
    import json
    import random

    from tokenmill import LLM, SamplingParams

    from bench.common import workload_path

    requests = json.load(open(workload_path("workload_main.json")))["requests"]
    rng = random.Random(0)
    needle = {"prompt_token_ids": requests[7]["prompt_token_ids"]}
    others = [{"prompt_token_ids": r["prompt_token_ids"]} for r in rng.sample(requests[8:], 64)]
    at = rng.randrange(65)
    params = SamplingParams(temperature=0, max_tokens=48, logprobs=3, ignore_eos=True)

    def run(llm, batch, index):
        out = llm.generate(batch, params, use_tqdm=False)[index].outputs[0]
        return out.token_ids, [
            [(t, lp.logprob) for t, lp in sorted(e.items())] for e in out.logprobs
        ]

    llm = LLM(dtype=dtype, max_num_batched_tokens=512, speculative_config=None, **SMALL)
    alone = run(llm, [needle], 0)
    batched = run(llm, others[:at] + [needle] + others[at:], at)
    del llm
    gc.collect()
    spec = LLM(dtype=dtype, speculative_config={"num_speculative_tokens": 5}, **SMALL)
    drafted = run(spec, [needle], 0)
    assert spec.llm_engine.stats().draft_tokens > 0
    assert batched == alone
    assert drafted == alone


def test_server_speculates_with_the_flag_and_counts_drafts(tiny_model):
    """tokenmill serve --speculative-config: a greedy completion pushed to
    repeat itself is drafted, streamed and not streamed alike, and /metrics
    counts the drafted and accepted tokens."""
    import httpx

    from tests.server_utils import ServerProcess, metric

    config = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}'
    server = ServerProcess(
        tiny_model("llama"),
        *("--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "128"),
        *("--speculative-config", config),
    )
    try:
        body = {
            "prompt": [5, 6, 7, 8],
            "max_tokens": 24,
            "temperature": 0,
            "logit_bias": {"50": 30},
        }
        url = f"{server.url}/v1/completions"
        whole = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        chunks = []
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += [c["text"] for c in json.loads(line[6:])["choices"]]
        assert "".join(chunks) == whole
        drafted = metric(server.url, "tokenmill:spec_decode_num_draft_tokens_total")
        accepted = metric(server.url, "tokenmill:spec_decode_num_accepted_tokens_total")
        assert drafted >= accepted > 0
    finally:
        assert server.stop() == 0


def test_seeded_sampling_is_the_same_with_drafts_and_in_any_batch(tiny_model):
    """A seeded request's draw for each position is a function of its seed,
    sequence and position: the same tokens alone, beside other requests, and
    with drafts verified (n = 2 included)."""
    from tokenmill import LLM, SamplingParams

    path = tiny_model("llama")
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9, 5, 6]}
    seeded = SamplingParams(
        temperature=0.9, max_tokens=40, seed=7, n=2, logit_bias={50: 3.0, 51: 3.0}
    )
    others = [{"prompt_token_ids": [20 + i, 30, 40 + i]} for i in range(5)]
    noise = SamplingParams(temperature=1.0, max_tokens=40)

    def run(llm, batch):
        outs = llm.generate([prompt, *batch], [seeded] + [noise] * len(batch), use_tqdm=False)
        return [c.token_ids for c in outs[0].outputs]

    plain = LLM(path, dtype="float32", enforce_eager=True, speculative_config=None)
    alone = run(plain, [])
    assert run(plain, others) == alone
    spec = LLM(
        path,
        dtype="float32",
        enforce_eager=True,
        speculative_config={"num_speculative_tokens": 4, "prompt_lookup_min": 1},
    )
    assert run(spec, []) == alone
    assert run(spec, others) == alone
    assert spec.llm_engine.stats().accepted_tokens > 0
