"""Sampler, SamplingParams, detokenizer and stop strings."""

import math

import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.engine.sampler import Sampler, SampleSlot
from tokenmill.errors import InvalidParameterError

from tests.conftest import VOCAB


def slot(params, out=(), prompt=(1, 2), gen=None):
    return SampleSlot(params, list(out), list(prompt), gen, eos_token_id=1)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(n=0), "n"),
        (dict(n=3, best_of=2), "best_of"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2**40), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(logit_bias={"a": 1}), "logit_bias"),
        (dict(temperature="hot"), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(frequency_penalty=float("-inf")), "frequency_penalty"),
        (dict(logit_bias={1: float("nan")}), "logit_bias"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_token_frequencies_match_softmax():
    """Chi-square goodness of fit of 20k draws over an 8-token vocabulary."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    params = SamplingParams(temperature=0.8)
    n = 20000
    sampler = Sampler(seed=0)
    tokens = sampler(logits.repeat(n, 1), [slot(params) for _ in range(n)]).token_ids
    counts = torch.bincount(tokens.long(), minlength=8).double()
    expected = torch.softmax(logits.double() / 0.8, -1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3, chi2  # p = 0.001 at 7 degrees of freedom


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(3000, 1)
    sampler = Sampler(seed=1)
    for params, allowed in [
        (SamplingParams(temperature=1, top_k=2), {0, 1}),
        (SamplingParams(temperature=1, top_p=0.7), {0, 1}),  # p(0)=0.64, then 0.87
        (SamplingParams(temperature=1, min_p=0.3), {0, 1}),  # p(1)/p(0)=0.37, p(2)/p(0)=0.14
    ]:
        toks = set(sampler(logits, [slot(params)] * len(logits)).token_ids.tolist())
        assert toks == allowed, params


def test_seeded_sampling_does_not_depend_on_the_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0, seed=42)

    def draw(rows):
        gen = torch.Generator().manual_seed(42)
        other = SamplingParams(temperature=1.0)
        slots = [slot(p, gen=gen) if r == 0 else slot(other) for r in range(rows)]
        return Sampler(seed=rows)(logits[:rows].clone(), slots).token_ids[0].item()

    assert len({draw(rows) for rows in (1, 3, 6)}) == 1


def test_penalties_bias_and_min_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 1] = 5.0  # EOS
    logits[0, 3] = 4.0
    s = Sampler()
    assert s(logits.clone(), [slot(SamplingParams(temperature=0))]).token_ids.item() == 1
    assert (
        s(logits.clone(), [slot(SamplingParams(temperature=0, min_tokens=2))]).token_ids.item() == 3
    )
    biased = SamplingParams(temperature=0, logit_bias={7: 10.0})
    assert s(logits.clone(), [slot(biased)]).token_ids.item() == 7
    rep = SamplingParams(temperature=0, repetition_penalty=2.0, min_tokens=1)
    # 3 appeared: 4.0 / 2 = 2.0 < token 5's 3.0
    logits[0, 5] = 3.0
    assert s(logits.clone(), [slot(rep, out=[3])]).token_ids.item() == 5
    freq = SamplingParams(temperature=0, frequency_penalty=1.0, min_tokens=5)
    assert s(logits.clone(), [slot(freq, out=[3, 3])]).token_ids.item() == 5


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits.clone(), [slot(SamplingParams(temperature=0, logprobs=3))] * 2)
    ref = logits.log_softmax(-1)
    for row in range(2):
        top = out.top_logprobs[row]
        tok = out.token_ids[row].item()
        assert math.isclose(top[tok].logprob, ref[row, tok].item(), rel_tol=1e-5)
        assert top[tok].rank == 1
        assert len(top) == 3


def test_incremental_detokenizer_equals_full_decode(smollm2_path):
    from tokenmill.loader.tokenizer import FastTokenizer

    tok = FastTokenizer(smollm2_path)
    texts = [
        "Héllo wörld! ça va? 東京タワー 🙂🙃 naïve café",
        "def f(x):\n    return x ** 2  # ünïcode",
    ]
    for text in texts:
        ids = tok.encode(text)
        g = torch.Generator().manual_seed(0)
        for prompt_len in (0, 1, 3):
            d = IncrementalDetokenizer(tok, ids[:prompt_len])
            pieces = [d.add(t) for t in ids[prompt_len:]]
            assert "".join(pieces) == d.text
            assert d.text == tok.decode(ids)[len(tok.decode(ids[:prompt_len])) :]
        # random byte-level tokens split multi-byte characters
        rand = torch.randint(0, 49152, (60,), generator=g).tolist()
        d = IncrementalDetokenizer(tok, [])
        for t in rand:
            d.add(t)
        full = tok.decode(rand, skip_special_tokens=True)
        assert d.text == full.rstrip("\ufffd") or d.text == full


def test_stop_checker_never_releases_a_partial_stop_string():
    sc = StopChecker(["STOP here"], include_stop=False)
    text = ""
    released = []
    for piece in ["abc ", "ST", "OP", " he", "re and more"]:
        text += piece
        match, emit = sc.check(text, len(piece))
        released.append(text[:emit])
        if match:
            break
    assert match == "STOP here"
    assert all("ST" not in r for r in released)
    assert released[-1] == "abc "


def test_stop_strings_and_stop_ids_end_generation(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="32MiB")
    base = llm.generate(
        ["The quick"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    stop = text[5:8]
    got = llm.generate(
        ["The quick"],
        SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0]
    c = got.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.index(stop)]
    inc = llm.generate(
        ["The quick"],
        SamplingParams(
            temperature=0,
            max_tokens=30,
            stop=[stop],
            include_stop_str_in_output=True,
            ignore_eos=True,
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert inc.text == text[: text.index(stop) + len(stop)]
    stop_id = ids[6]
    got = llm.generate(
        ["The quick"],
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert got.outputs[0].token_ids == ids[: ids.index(stop_id) + 1]
    assert got.outputs[0].stop_reason == stop_id


def test_engine_rejects_bad_input_and_keeps_working(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="32MiB", max_model_len=64)
    with pytest.raises(InvalidParameterError, match="maximum context length"):
        llm.generate([list(range(2, 80))], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(InvalidParameterError):
        llm.generate([[VOCAB + 5]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(InvalidParameterError):
        llm.generate([[]], SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate(["The quick"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    st = llm.engine.stats()
    assert st.num_free_blocks == st.num_blocks


def test_kv_budget_too_small_fails_at_start(tiny_model):
    from tokenmill.errors import KVCacheTooSmallError

    with pytest.raises(KVCacheTooSmallError, match="max_model_len"):
        LLM(tiny_model("llama"), dtype="float32", kv_cache_memory=4096, max_model_len=512)


def test_n_and_best_of(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="32MiB")
    p = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=10, ignore_eos=True)
    a = llm.generate(["fox"], p, use_tqdm=False)[0]
    b = llm.generate(["fox"], p, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert sorted(c.index for c in a.outputs) == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    best = llm.generate(
        ["fox"],
        SamplingParams(temperature=1.0, n=2, best_of=5, seed=1, max_tokens=8),
        use_tqdm=False,
    )[0]
    assert len(best.outputs) == 2
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


def test_fast_argmax_is_torch_argmax_with_first_index_on_ties():
    from tokenmill.engine.sampler import argmax_rows

    x = torch.randn(7, 1000)
    x[2, [10, 400]] = 50.0  # a tie: the first index wins
    x[5, :] = 1.0
    assert argmax_rows(x).tolist() == x.argmax(-1).tolist()
    assert argmax_rows(x)[2] == 10 and argmax_rows(x)[5] == 0
