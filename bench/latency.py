"""Single-stream latency: one request alone, time to first token and decode
tokens/s, beside transformers generating the same request in the same run,
and llama.cpp on the same weights when a llama-cpp-python interpreter is given.

A GGUF model runs as tokenmill runs it by default, from its blocks, and
llama.cpp runs the file as shipped; with --no-gguf-blocks both run its
weights dequantized to --dtype.

  python -m bench.latency [--model M.gguf] [--dtype bfloat16] [--prompt-len 128]
      [--max-tokens 128] [--no-gguf-blocks] [--llama-cpp-python ../peers/llamacpp/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

from bench.common import load_workload, table


def tokenmill_latency(path, prompt, max_tokens, dtype, gguf_blocks):
    from tokenmill import SamplingParams
    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine

    args = EngineArgs(model=path, dtype=dtype, max_model_len=2048, gguf_blocks=gguf_blocks)
    engine = LLMEngine(args)
    for i in range(2):  # warm-up
        engine.add_request(
            f"w{i}", {"prompt_token_ids": [11] * 16}, SamplingParams(max_tokens=8, temperature=0)
        )
        while engine.has_unfinished_requests():
            engine.step()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("r", {"prompt_token_ids": prompt}, params)
    start = time.perf_counter()
    first = None
    steps = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - t)
        if first is None and outs and outs[0].outputs[0].token_ids:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, (max_tokens - 1) / (total - first), sorted(steps[1:])[len(steps[1:]) // 2]


def hf_latency(path, prompt, max_tokens, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(
            ids,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        total = time.perf_counter() - t
    return ttft, (max_tokens - 1) / (total - ttft)


def llama_cpp_latency(python, gguf_path, prompt, max_tokens, dtype=None):
    """llama.cpp on `gguf_path`, as shipped or dequantized to `dtype`, through
    bench/llama_cpp_runner.py."""
    from bench.llama_cpp_runner import dequantized_gguf

    runner = os.path.join(os.path.dirname(__file__), "llama_cpp_runner.py")
    with tempfile.TemporaryDirectory() as d:
        model, out = os.path.join(d, "model.gguf"), os.path.join(d, "result.json")
        if dtype is None:
            model = gguf_path
        else:
            dequantized_gguf(gguf_path, model, dtype)
        cmd = [python, runner, "--gguf", model, "--out", out, "--max-tokens", str(max_tokens)]
        subprocess.run(cmd + ["--prompt", ",".join(map(str, prompt))], check=True)
        with open(out) as f:
            r = json.load(f)
    return r["ttft_s"], r["decode_tok_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--llama-cpp-python", default=None, help="interpreter with llama-cpp-python")
    ap.add_argument("--gguf-blocks", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    from tokenmill.loader.gguf import gguf_to_hf
    from tokenmill.loader.hf import resolve_model_path

    gguf_path = resolve_model_path(args.model)
    if args.llama_cpp_python and not gguf_path.endswith(".gguf"):
        ap.error("llama.cpp needs a GGUF model (the default model is one)")
    path = gguf_to_hf(gguf_path) if gguf_path.endswith(".gguf") else gguf_path  # transformers'
    prompt = load_workload("workload_main.json", 1)[0]["prompt_token_ids"][: args.prompt_len]
    from tokenmill.config import EngineArgs

    blocks = EngineArgs.gguf_blocks if args.gguf_blocks is None else args.gguf_blocks
    blocks = blocks and gguf_path.endswith(".gguf")
    ttft, tps, step = tokenmill_latency(gguf_path, prompt, args.max_tokens, args.dtype, blocks)
    rows = [["tokenmill", ttft * 1e3, tps, step * 1e3, 1.0]]
    if not args.no_hf:
        hf_ttft, hf_tps = hf_latency(path, prompt, args.max_tokens, args.dtype)
        rows.append(["transformers", hf_ttft * 1e3, hf_tps, 1e3 / hf_tps, tps / hf_tps])
    if args.llama_cpp_python:
        lc_ttft, lc_tps = llama_cpp_latency(
            args.llama_cpp_python,
            gguf_path,
            prompt,
            args.max_tokens,
            None if blocks else args.dtype,
        )
        rows.append(["llama.cpp", lc_ttft * 1e3, lc_tps, 1e3 / lc_tps, tps / lc_tps])
    weights = "GGUF blocks as shipped, activations " if blocks else ""
    print(
        f"Single stream, {len(prompt)}-token prompt, {args.max_tokens} new tokens, "
        f"{weights}{args.dtype}"
    )
    print(
        table(
            rows,
            ["engine", "TTFT ms", "decode tok/s", "decode step ms", "tokenmill decode speed-up"],
        )
    )


if __name__ == "__main__":
    main()
