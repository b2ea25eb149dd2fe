"""Offline throughput: all requests at once, greedy, EOS ignored.

Prints output and total tokens/s of tokenmill beside transformers' batched
generate (left-padded) on the same requests, and beside vLLM when given the
interpreter of a virtualenv holding it (its runner from ../shared/bench/peers
runs after tokenmill, never at the same time).

  python -m bench.throughput --workload workload_main.json [--dtype bfloat16] [--hf-requests 32]
      [--device cuda] [--vllm-python ../peers/vllm/bin/python --vllm-model HF_FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

from bench.common import Timer, load_workload, synthetic_workload, table, workload_path


def run_tokenmill(model, requests, dtype, args):
    from tokenmill import LLM, SamplingParams

    llm = LLM(
        model,
        dtype=dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_itl_ms=args.max_itl_ms,
        enable_prefix_caching=False,
        device=args.device,
        **({} if args.gguf_blocks is None else {"gguf_blocks": args.gguf_blocks}),
    )
    warm = [{"prompt_token_ids": [7] * 16}]
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [
        SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests
    ]
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=True)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return t.seconds, out_tokens


def run_vllm(python, model, workload, num_requests, dtype):
    """vLLM's offline run of the same workload file in the same dtype, through its peer runner."""
    runner = os.path.join(os.path.dirname(__file__), "../../shared/bench/peers/vllm_runner.py")
    with tempfile.TemporaryDirectory() as d:
        if num_requests:
            with open(workload) as f:
                w = json.load(f)
            w["requests"] = w["requests"][:num_requests]
            workload = os.path.join(d, "workload.json")
            with open(workload, "w") as f:
                json.dump(w, f)
        out = os.path.join(d, "vllm.json")
        cmd = [python, runner, "--workload", workload, "--out", out, "--mode", "offline"]
        cmd += ["--model", model, "--dtype", dtype, "--preload", "none"]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def run_hf(path, requests, dtype, batch_size, device):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.to(device)
    out_tokens = 0
    with Timer() as t, torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            width = max(len(r["prompt_token_ids"]) for r in chunk)
            ids = torch.tensor(
                [[0] * (width - len(r["prompt_token_ids"])) + r["prompt_token_ids"] for r in chunk]
            )
            mask = (
                torch.arange(width)[None, :]
                >= (width - torch.tensor([len(r["prompt_token_ids"]) for r in chunk]))[:, None]
            ).long()
            new = max(r["max_tokens"] for r in chunk)
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            out_tokens += (out.shape[1] - width) * len(chunk)
    return t.seconds, out_tokens


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--workload", default="workload_main.json")
    ap.add_argument(
        "--num-requests", type=int, default=None, help="first N requests of the workload"
    )
    ap.add_argument("--synthetic", default=None, help="N,PROMPT,OUTPUT instead of a workload file")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument(
        "--max-itl-ms", type=float, default=None, help="step-time target (default: the engine's)"
    )
    ap.add_argument(
        "--hf-requests", type=int, default=32, help="requests given to transformers (0 skips it)"
    )
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for tokenmill and transformers")
    ap.add_argument(
        "--gguf-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run a GGUF model from its blocks or dequantized (default: tokenmill's default)",
    )
    ap.add_argument("--vllm-python", default=None, help="interpreter of a vllm virtualenv")
    ap.add_argument("--vllm-model", default=None, help="HF folder for vLLM (default: --model)")
    args = ap.parse_args()

    if args.synthetic:
        n, p, o = map(int, args.synthetic.split(","))
        requests = synthetic_workload(n, p, o)
    else:
        requests = load_workload(args.workload, args.num_requests)
    from tokenmill.loader.gguf import gguf_to_hf
    from tokenmill.loader.hf import resolve_model_path

    path = resolve_model_path(args.model)  # tokenmill reads GGUF files themselves
    ref_path = gguf_to_hf(path) if path.endswith(".gguf") else path  # the peers' folder

    rows = []
    seconds, out_tokens = run_tokenmill(path, requests, args.dtype, args)
    total = out_tokens + sum(len(r["prompt_token_ids"]) for r in requests)
    ours = out_tokens / seconds
    rows.append(["tokenmill", len(requests), seconds, ours, total / seconds, 1.0])
    if args.hf_requests:
        sub = requests[: args.hf_requests]
        hs, hout = run_hf(ref_path, sub, args.dtype, args.hf_batch_size, args.device)
        htotal = hout + sum(len(r["prompt_token_ids"]) for r in sub)
        rows.append(
            [
                f"transformers (batch {args.hf_batch_size})",
                len(sub),
                hs,
                hout / hs,
                htotal / hs,
                ours / (hout / hs),
            ]
        )
    if args.vllm_python and not args.synthetic:
        workload = workload_path(args.workload)
        r = run_vllm(
            args.vllm_python, args.vllm_model or ref_path, workload, args.num_requests, args.dtype
        )
        vout, vs = r["output_tokens"], r["elapsed_s"]
        rows.append(
            [
                f"vLLM {r['config']['vllm']}",
                len(requests),
                vs,
                vout / vs,
                r["total_tok_per_s"],
                ours / (vout / vs),
            ]
        )
    print(f"\nOffline throughput, {args.dtype} on {args.device}, model {os.path.basename(path)}")
    print(
        table(
            rows,
            ["engine", "requests", "seconds", "output tok/s", "total tok/s", "tokenmill speed-up"],
        )
    )


if __name__ == "__main__":
    main()
