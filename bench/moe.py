"""Decode step time of a mixture-of-experts model (Qwen3-MoE-shaped, random
weights) beside the dense model with the same active parameters and beside
transformers on the same MoE checkpoint, at batch 1 and 16, in one run.

  python -m bench.moe [--layers 4] [--experts 128] [--top-k 8] [--hidden 2048]
      [--expert-width 768] [--batch 1 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch

from bench.common import table

VOCAB = 49152  # the default model's tokenizer detokenizes the outputs


def default_tokenizer() -> str:
    from tokenmill.loader.gguf import gguf_metadata
    from tokenmill.loader.hf import default_model_path

    return gguf_metadata(default_model_path())


def build(path: str, args, moe: bool) -> str:
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128 * 2 if args.hidden >= 128 else 2,
        num_key_value_heads=4 if args.hidden >= 512 else 1,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    if moe:
        config = transformers.Qwen3MoeConfig(
            **common,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            moe_intermediate_size=args.expert_width,
            intermediate_size=args.expert_width,
            norm_topk_prob=True,
        )
    else:  # the same active parameters: top_k experts' width in one MLP
        config = transformers.Qwen3Config(
            **common, intermediate_size=args.top_k * args.expert_width
        )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, args.dtype)
        )
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


def prompts(batch: int, length: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(2, VOCAB, (length,), generator=g).tolist() for _ in range(batch)]


def tokenmill_step(path: str, batch: int, steps: int, dtype: str) -> float:
    """Median decode step time (s) of `batch` sequences decoding together."""
    from tokenmill import SamplingParams
    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=path,
        dtype=dtype,
        max_model_len=512,
        kv_cache_memory="256MiB",
        tokenizer=default_tokenizer(),
    )
    engine = LLMEngine(args)
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    times = []
    for warm in (True, False):
        for i, p in enumerate(prompts(batch)):
            engine.add_request(f"{warm}{i}", {"prompt_token_ids": p}, params)
        times.clear()
        engine.step()  # prefill
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    engine.shutdown()
    del engine
    gc.collect()
    return sorted(times)[len(times) // 2]


def hf_step(path: str, batch: int, steps: int, dtype: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts(batch))

    def generate(n):
        t = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=1,
        )
        return time.perf_counter() - t

    with torch.inference_mode():
        generate(2)
        first = generate(1)
        total = generate(steps + 1)
    return (total - first) / steps  # the model is freed with this frame


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-width", type=int, default=768)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        moe = build(os.path.join(d, "moe"), args, moe=True)
        dense = build(os.path.join(d, "dense"), args, moe=False)
        gc.collect()
        for batch in args.batch:
            t_moe = tokenmill_step(moe, batch, args.steps, args.dtype)
            t_dense = tokenmill_step(dense, batch, args.steps, args.dtype)
            row = [batch, t_moe * 1e3, t_dense * 1e3, t_moe / t_dense]
            print(
                f"batch {batch}: MoE {t_moe * 1e3:.2f} ms, dense {t_dense * 1e3:.2f} ms", flush=True
            )
            if not args.no_hf:
                t_hf = hf_step(moe, batch, args.steps, args.dtype)
                row += [t_hf * 1e3, t_hf / t_moe]
            rows.append(row)
            gc.collect()
    print(
        f"Decode step, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
        f"hidden {args.hidden}, expert width {args.expert_width}, {args.dtype}"
    )
    header = ["batch", "MoE ms", "dense (same active) ms", "MoE / dense"]
    if not args.no_hf:
        header += ["transformers MoE ms", "tokenmill speed-up"]
    print(table(rows, header))


if __name__ == "__main__":
    main()
