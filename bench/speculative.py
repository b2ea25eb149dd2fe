"""Speculative decoding: speculation off against each proposer, one sitting.

Two workloads from workload_main's token windows: copy-heavy (a passage,
then the instruction to repeat it word for word, in the model's chat
format) and free generation (workload_main itself). For each: decode tokens/s
of single streams (batch 1), offline throughput with every request at once,
and the acceptance of the draft tokens. Greedy, EOS ignored.

Then decode tokens/s at fixed batch sizes of the free workload, with how
many tokens per step were drafted: where speculation switches itself off.

  python -m bench.speculative [--num-requests 256] [--single 6] [--k 5] [--batches 1,2,4,8,16,32,64]
      [--methods off,ngram,suffix] [--draft-model PATH]
"""

from __future__ import annotations

import argparse
import gc
import time

from bench.common import load_workload, table

INSTRUCTION = "\n\nRepeat the text above word for word."


def copy_workload(tokenizer, requests: list[dict], passage_tokens: int) -> list[dict]:
    """Each window's first passage_tokens tokens as a user message asking to
    repeat it; the template's pieces are tokenized once around a marker."""
    marker = "\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker + INSTRUCTION}],
        add_generation_prompt=True,
        tokenize=False,
    )
    head, tail = text.split(marker)
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    return [
        {
            "prompt_token_ids": head_ids + r["prompt_token_ids"][:passage_tokens] + tail_ids,
            "max_tokens": r["max_tokens"],
        }
        for r in requests
    ]


def single_stream(engine, requests: list[dict]) -> float:
    """Decode tokens/s of requests run one at a time (after the first token)."""
    from tokenmill import SamplingParams

    tokens, seconds = 0, 0.0
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True)
        engine.add_request(f"s{i}", {"prompt_token_ids": r["prompt_token_ids"]}, params)
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and outs and outs[0].outputs[0].token_ids:
                first = time.perf_counter()
        seconds += time.perf_counter() - first
        tokens += r["max_tokens"] - 1
    return tokens / seconds


def offline(llm, requests: list[dict]) -> float:
    from tokenmill import SamplingParams

    params = [
        SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests
    ]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def by_batch(llm, requests: list[dict], sizes: list[int]) -> dict:
    """Output tokens/s and draft tokens per output token, per batch size."""
    found = {}
    for b in sizes:
        before = llm.llm_engine.stats()
        tps = offline(llm, requests[:b])
        after = llm.llm_engine.stats()
        drafted = (after.draft_tokens - before.draft_tokens) / sum(
            r["max_tokens"] for r in requests[:b]
        )
        found[b] = (tps, drafted)
    return found


def measure(llm, workloads: dict, single: int) -> dict:
    engine = llm.llm_engine
    offline(llm, workloads["free"][:4])  # warm-up
    found = {}
    for name, requests in workloads.items():
        before = engine.stats()
        batch1 = single_stream(engine, requests[:single])
        mid = engine.stats()
        tps = offline(llm, requests)
        after = engine.stats()
        found[name] = (batch1, tps, _acceptance(before, mid), _acceptance(mid, after))
    return found


def _acceptance(a, b) -> str:
    drafted = b.draft_tokens - a.draft_tokens
    if not drafted:
        return "-"
    return f"{(b.accepted_tokens - a.accepted_tokens) / drafted:.0%} of {drafted}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--single", type=int, default=6, help="requests run alone (batch 1)")
    ap.add_argument("--passage-tokens", type=int, default=200)
    ap.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: the workload's")
    ap.add_argument("--methods", default="off,ngram,suffix", help="off first: the baseline")
    ap.add_argument("--dtype", default="auto", help="the target's")
    ap.add_argument(
        "--draft-model",
        default=None,
        help="adds draft_model with this model (same tokenizer; default: the embedded one)",
    )
    args = ap.parse_args()

    from tokenmill import LLM

    free = load_workload("workload_main.json", args.num_requests)
    if args.max_tokens:
        free = [{**r, "max_tokens": args.max_tokens} for r in free]
    every = {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": args.k},
        "suffix": {"method": "suffix", "num_speculative_tokens": args.k},
    }
    configs = {name: every[name] for name in ["off", *args.methods.split(",")] if name in every}
    if args.draft_model:
        from tokenmill.loader.hf import default_model_path

        configs["draft_model"] = {
            "method": "draft_model",
            "model": default_model_path() if args.draft_model == "default" else args.draft_model,
            "num_speculative_tokens": args.k,
        }
    results, batches, workloads = {}, {}, None
    for name, config in configs.items():  # one engine at a time
        llm = LLM(args.model, dtype=args.dtype, speculative_config=config)
        if workloads is None:
            copy = copy_workload(llm.get_tokenizer(), free, args.passage_tokens)
            workloads = {"copy": copy, "free": free}
        results[name] = measure(llm, workloads, args.single)
        sizes = [int(b) for b in args.batches.split(",") if b]
        batches[name] = by_batch(llm, workloads["free"], sizes)
        del llm
        gc.collect()  # an engine holds reference cycles: free its KV cache now
    rows = []
    for workload in workloads:
        base = results["off"][workload]
        for name, res in results.items():
            b1, tps, acc1, acc = res[workload]
            rows.append(
                [
                    workload,
                    name,
                    f"{b1:.1f}",
                    f"{b1 / base[0]:.2f}x",
                    acc1,
                    f"{tps:.1f}",
                    f"{tps / base[1]:.2f}x",
                    acc,
                ]
            )
    header = [
        "workload",
        "speculation",
        "batch-1 decode tok/s",
        "vs off",
        "accepted",
        f"offline tok/s ({args.num_requests} req)",
        "vs off",
        "accepted",
    ]
    print(table(rows, header))
    rows = []
    for b in batches["off"]:
        base = batches["off"][b][0]
        for name, res in batches.items():
            tps, drafted = res[b]
            rows.append([b, name, f"{tps:.1f}", f"{tps / base:.2f}x", f"{drafted:.2f}"])
    header = ["batch", "speculation", "output tok/s", "vs off", "drafted per token"]
    print(table(rows, header))


if __name__ == "__main__":
    main()
