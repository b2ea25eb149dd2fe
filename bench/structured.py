"""What constrained decoding costs.

Grammar libraries (`--backends`): llguidance and xgrammar side by side on the
default model's vocabulary: tokenizer setup, compile time per JSON schema,
and mask time per token (p50, p99) along the same token walks through each
schema (tokens drawn at random among those both allow, compact JSON).

End to end: tokenmill's output tokens/s on the same prompts with and without
a JSON schema, at batch 1 and batch 64, in one run; the mask is computed
beside the forward pass.

  python -m bench.structured [--backends] [--batches 1,64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from bench.common import Timer, load_workload, table

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}},
                    },
                    "required": ["id"],
                },
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
            "temp": {"type": "number", "minimum": -50, "maximum": 60},
            "ok": {"type": "boolean"},
        },
        "required": ["city", "temp", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "code": {
                "anyOf": [{"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}, {"type": "null"}]
            },
            "values": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
        },
        "required": ["code", "values"],
    },
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["title", "year", "tags"],
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def allowed_ids(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def compare_backends(steps: int, walks: int) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llg_torch
    import xgrammar as xgr
    from tokenmill.loader.gguf import gguf_metadata
    from tokenmill.loader.hf import resolve_model_path
    from tokenmill.structured_output import JSON_SEPARATORS
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(gguf_metadata(resolve_model_path(None)))
    vocab = len(hf)
    with Timer() as llg_setup:
        llg_tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    with Timer() as xgr_setup:
        compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab), cache_enabled=False
        )
    times = {name: {"compile": [], "mask": []} for name in ("llguidance", "xgrammar")}
    rejected = 0
    rng = random.Random(0)
    for schema in SCHEMAS:
        for _ in range(walks):
            with Timer() as t:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    schema,
                    overrides={
                        "whitespace_flexible": False,
                        "item_separator": JSON_SEPARATORS[0],
                        "key_separator": JSON_SEPARATORS[1],
                    },
                )
                llg = llguidance.LLMatcher(llg_tok, grammar, log_level=0)
            times["llguidance"]["compile"].append(t.seconds)
            with Timer() as t:
                compiled = compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=False, separators=JSON_SEPARATORS
                )
            times["xgrammar"]["compile"].append(t.seconds)
            xm = xgr.GrammarMatcher(compiled)
            llg_mask = llg_torch.allocate_token_bitmask(1, vocab)
            xgr_mask = xgr.allocate_token_bitmask(1, vocab)
            for _ in range(steps):
                start = time.perf_counter()
                llg_torch.fill_next_token_bitmask(llg, llg_mask)
                times["llguidance"]["mask"].append(time.perf_counter() - start)
                start = time.perf_counter()
                xm.fill_next_token_bitmask(xgr_mask)
                times["xgrammar"]["mask"].append(time.perf_counter() - start)
                both = np.intersect1d(
                    allowed_ids(llg_mask[0].numpy(), vocab), allowed_ids(xgr_mask[0].numpy(), vocab)
                )
                both = both[both != hf.eos_token_id]
                if llg.is_stopped() or not len(both):
                    break
                token = int(rng.choice(both.tolist()))
                llg.consume_token(token)
                if not xm.accept_token(token):
                    rejected += 1
                    break
    rows = []
    for name, setup in (("llguidance", llg_setup), ("xgrammar", xgr_setup)):
        c, m = times[name]["compile"], times[name]["mask"]
        rows.append(
            [
                name,
                setup.seconds * 1e3,
                statistics.median(c) * 1e3,
                max(c) * 1e3,
                statistics.median(m) * 1e6,
                pct(m, 0.99) * 1e6,
                len(m),
            ]
        )
    print(f"Grammar libraries on a {vocab}-token vocabulary, {len(SCHEMAS)} JSON schemas")
    print(
        table(
            rows,
            [
                "library",
                "setup ms",
                "compile p50 ms",
                "compile max ms",
                "mask p50 us",
                "mask p99 us",
                "masks",
            ],
        )
    )
    if rejected:
        print(f"({rejected} walks ended where xgrammar refused a token llguidance allowed)")


def end_to_end(batches: list[int], max_tokens: int) -> None:
    from tokenmill import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(enable_prefix_caching=False)  # the twins share prompts
    prompts = [
        r["prompt_token_ids"][:64] for r in load_workload("workload_main.json", max(batches))
    ]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)
    schema = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    llm.generate(prompts[:1], schema, use_tqdm=False)  # the grammar compiles once
    rows = []
    for batch in batches:
        inputs = [{"prompt_token_ids": p} for p in prompts[:batch]]
        with Timer() as constrained:
            outs = llm.generate(inputs, schema, use_tqdm=False)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        # the same number of tokens per request, unconstrained
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        with Timer() as unconstrained:
            llm.generate(inputs, free, use_tqdm=False)
        tokens = sum(lengths)
        ratio = unconstrained.seconds / constrained.seconds
        rows.append([batch, tokens / unconstrained.seconds, tokens / constrained.seconds, ratio])
    print(
        f"Output tok/s with and without a JSON schema (up to {max_tokens} tokens; "
        "unconstrained requests generate as many tokens as their constrained twins)"
    )
    print(table(rows, ["batch", "unconstrained", "JSON schema", "ratio"]))


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backends", action="store_true", help="compare llguidance and xgrammar only")
    ap.add_argument("--steps", type=int, default=60, help="tokens per walk (--backends)")
    ap.add_argument("--walks", type=int, default=5, help="walks per schema (--backends)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.backends:
        compare_backends(args.steps, args.walks)
        return
    end_to_end([int(b) for b in args.batches.split(",")], args.max_tokens)


if __name__ == "__main__":
    main()
