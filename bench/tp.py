"""Tensor-parallel throughput on this machine: TP=1 and TP=2 side by side on
the same requests, and the share of rank 0's step time spent in all-reduce.

  python -m bench.tp [--workload workload_small.json] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import time

from tokenmill import distributed

from bench.common import Timer, load_workload, table


def build_model(folder: str) -> str:
    """SmolLM2-135M's shape with 8 heads and 4 KV heads, which two ranks can split."""
    import shutil

    import torch
    from tokenmill.loader.gguf import gguf_metadata
    from tokenmill.loader.hf import default_model_path
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = gguf_metadata(default_model_path())  # the default model's tokenizer
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), folder)
    return folder


def run(path, requests, dtype, tp):
    from tokenmill import LLM, SamplingParams

    llm = LLM(
        path, dtype=dtype, tensor_parallel_size=tp, max_model_len=2048, enable_prefix_caching=False
    )
    llm.generate([{"prompt_token_ids": [9] * 8}], SamplingParams(max_tokens=2), use_tqdm=False)
    spent = [0.0]
    inner = distributed.all_reduce

    def timed(x):
        t = time.perf_counter()
        y = inner(x)
        spent[0] += time.perf_counter() - t
        return y

    distributed.all_reduce = timed  # the layers call it through the module
    try:
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
        params = [
            SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True)
            for r in requests
        ]
        with Timer() as t:
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        distributed.all_reduce = inner
        llm.engine.shutdown()
    out_tokens = sum(r["max_tokens"] for r in requests)
    return t.seconds, out_tokens / t.seconds, spent[0] / t.seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="workload_small.json")
    ap.add_argument("--num-requests", type=int, default=None, help="first N requests")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--model", default=None, help="default: a random model shaped like SmolLM2 with 8 heads"
    )
    args = ap.parse_args()
    import tempfile

    path = args.model or build_model(tempfile.mkdtemp())
    requests = load_workload(args.workload, args.num_requests)
    rows = []
    for tp in (1, 2):
        seconds, tps, share = run(path, requests, args.dtype, tp)
        rows.append([tp, seconds, tps, f"{100 * share:.1f}%"])
    rows[1].append(rows[1][2] / rows[0][2])
    rows[0].append(1.0)
    print(
        f"{args.model or 'SmolLM2-sized random Llama (8 heads, 4 KV heads)'}, {args.workload}, {args.dtype}"
    )
    print(table(rows, ["TP", "seconds", "output tok/s", "all-reduce share (rank 0)", "vs TP=1"]))


if __name__ == "__main__":
    main()
