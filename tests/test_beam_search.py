"""Parallel sampling, best_of and beam search on shared KV blocks."""

import pytest
import torch
from tokenmill import LLM, BeamSearchParams, SamplingParams
from tokenmill.errors import InvalidParameterError

from tests.conftest import VOCAB, hf_model


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "width,length_penalty,early",
    [(1, 1.0, False), (2, 1.0, False), (4, 0.5, False), (4, 1.0, True), (3, 2.0, "never")],
)
def test_beam_search_matches_transformers(tiny_model, arch, width, length_penalty, early):
    path = tiny_model(arch)
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    ref_model = hf_model(path)
    for p in prompts([5, 17], seed=width):
        out = llm.beam_search(
            [{"prompt_token_ids": p}],
            BeamSearchParams(width, 12, length_penalty=length_penalty, early_stopping=early),
            use_tqdm=False,
        )[0]
        ref = ref_model.generate(
            torch.tensor([p]),
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            max_new_tokens=12,
            length_penalty=length_penalty,
            early_stopping=early,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=1,
        )
        ref_seqs = [row[len(p) :].tolist() for row in ref.sequences]
        ref_seqs = [
            s[: s.index(1) + 1] if 1 in s else s for s in ref_seqs
        ]  # drop padding after EOS
        assert [s.tokens[len(p) :] for s in out.sequences] == ref_seqs
        if width > 1:  # width 1 is greedy search in transformers, without scores
            torch.testing.assert_close(
                torch.tensor([s.score for s in out.sequences]),
                ref.sequences_scores.float(),
                rtol=1e-4,
                atol=1e-4,
            )


def test_beam_search_on_smollm2(smollm2_path):
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory="256MiB", max_model_len=1024)
    tok = llm.get_tokenizer()
    ref_model = hf_model(smollm2_path)
    for text in ["The capital of France is", "Once upon a time"]:
        ids = tok(text).input_ids
        out = llm.beam_search([text], BeamSearchParams(4, 10), use_tqdm=False)[0]
        ref = ref_model.generate(
            torch.tensor([ids]),
            num_beams=4,
            num_return_sequences=4,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=2,
        )
        assert out.sequences[0].tokens == ref[0].tolist()
        assert out.sequences[0].text == tok.decode(ref[0], skip_special_tokens=True)


def test_kv_blocks_shared_by_samples_and_beams(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    engine = llm.engine
    prompt = {"prompt_token_ids": prompts([500])[0]}

    def peak_blocks(add):
        add()
        peak = 0
        while engine.has_unfinished_requests():
            engine.step()
            st = engine.stats()
            peak = max(peak, st.num_blocks - st.num_free_blocks)
        return peak

    one = peak_blocks(
        lambda: engine.add_request("one", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    )
    eight = peak_blocks(
        lambda: engine.add_request(
            "n8", prompt, SamplingParams(n=8, temperature=1, max_tokens=8, ignore_eos=True)
        )
    )
    beams = peak_blocks(lambda: engine.add_beam_request("b8", prompt, BeamSearchParams(8, 8)))
    assert eight < 1.5 * one, (eight, one)
    assert beams < 1.5 * one, (beams, one)
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks


def test_beam_search_survives_preemption_and_aborts(tiny_model):
    path = tiny_model("llama")
    big = LLM(path, dtype="float32", kv_cache_memory="64MiB", max_model_len=256)
    ps = prompts([40, 60, 50, 45], seed=3)
    expected = [
        o.sequences[0].tokens
        for o in big.beam_search(
            [{"prompt_token_ids": p} for p in ps],
            BeamSearchParams(4, 20, ignore_eos=True),
            use_tqdm=False,
        )
    ]
    small = LLM(
        path,
        dtype="float32",
        kv_cache_memory=24 * big.engine.runner.kv_bytes_per_block,
        max_model_len=128,
    )
    got = small.beam_search(
        [{"prompt_token_ids": p} for p in ps],
        BeamSearchParams(4, 20, ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.sequences[0].tokens for o in got] == expected
    assert small.engine.stats().preemptions > 0
    engine = small.engine
    for i in range(6):
        engine.add_beam_request(f"x{i}", {"prompt_token_ids": ps[i % 4]}, BeamSearchParams(3, 30))
    for _ in range(5):
        engine.step()
    for i in range(0, 6, 2):
        engine.abort_request(f"x{i}")
    while engine.has_unfinished_requests():
        engine.step()
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks


def test_bad_beam_and_sampling_parameters():
    with pytest.raises(InvalidParameterError, match="beam_width"):
        BeamSearchParams(0, 10)
    with pytest.raises(InvalidParameterError, match="best_of"):
        SamplingParams(n=4, best_of=2)
