"""Beam search at several widths beside transformers' beam search, and KV
blocks per request against n (parallel sampling) from the same run.

  python -m bench.beam [--num-prompts 64] [--prompt-len 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import Timer, load_workload, table


def peak_blocks(engine, add):
    add()
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        st = engine.stats()
        peak = max(peak, st.num_blocks - st.num_free_blocks)
    return peak


def report(rows, args):
    print(
        f"Beam search, {args.prompt_len}-token prompts, {args.max_tokens} new tokens, {args.dtype}"
    )
    header = ["beam width", "prompts", "tokenmill req/s", "transformers req/s", "speed-up"]
    print(table(rows, header[: len(rows[0])]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--widths", default="1,4,8")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--hf-prompts", type=int, default=16, help="prompts given to transformers (0 skips it)"
    )
    ap.add_argument("--blocks-only", action="store_true", help="only the KV-blocks table")
    args = ap.parse_args()

    from tokenmill import LLM, BeamSearchParams, SamplingParams
    from tokenmill.loader.gguf import gguf_to_hf
    from tokenmill.loader.hf import default_model_path
    from transformers import AutoModelForCausalLM

    path = gguf_to_hf(default_model_path())
    prompts = [
        r["prompt_token_ids"][: args.prompt_len]
        for r in load_workload("workload_main.json", args.num_prompts)
    ]
    llm = LLM(path, dtype=args.dtype, max_model_len=1024, enable_prefix_caching=False)
    hf = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        if args.hf_prompts and not args.blocks_only
        else None
    )

    rows = []
    for width in map(int, args.widths.split(",") if not args.blocks_only else []):
        params = BeamSearchParams(width, args.max_tokens, ignore_eos=True)
        with Timer() as t:
            llm.beam_search([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ours = len(prompts) / t.seconds
        row = [width, len(prompts), ours]
        if hf is not None:
            sub = prompts[: args.hf_prompts]
            with Timer() as th, torch.inference_mode():
                for p in sub:
                    hf.generate(
                        torch.tensor([p]),
                        num_beams=width,
                        do_sample=False,
                        max_new_tokens=args.max_tokens,
                        min_new_tokens=args.max_tokens,
                        pad_token_id=0,
                    )
            theirs = len(sub) / th.seconds
            row += [theirs, ours / theirs]
        rows.append(row)
    if rows:
        report(rows, args)

    engine = llm.engine
    long_ids = [t for r in load_workload("workload_main.json") for t in r["prompt_token_ids"]][:512]
    long_prompt = {"prompt_token_ids": long_ids}
    block_rows = []
    for n in (1, 2, 4, 8):
        samples = peak_blocks(
            engine,
            lambda n=n: engine.add_request(
                f"s{n}",
                long_prompt,
                SamplingParams(n=n, temperature=1, max_tokens=16, ignore_eos=True),
            ),
        )
        beams = peak_blocks(
            engine,
            lambda n=n: engine.add_beam_request(
                f"b{n}", long_prompt, BeamSearchParams(n, 16, ignore_eos=True)
            ),
        )
        block_rows.append([n, samples, beams])
    one = block_rows[0][1]
    for r in block_rows:
        r += [r[1] / one, r[2] / one]
    print(
        f"\nPeak KV blocks of one request, {len(long_prompt['prompt_token_ids'])}-token prompt, 16 new tokens"
    )
    print(
        table(
            block_rows,
            ["n / beam width", "n samples", "beam search", "samples vs n=1", "beams vs n=1"],
        )
    )


if __name__ == "__main__":
    main()
