"""Each kernel beside a torch composite of the same op, on SmolLM2-135M and
Llama-3-8B shapes, plus decode attention's achieved memory bandwidth against
the bandwidth of a large copy measured in the same run, and prefill
attention's achieved TFLOPS.

  python -m bench.kernel_ops [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import argparse

import tokenmill.ops as ops
import torch
import torch.nn.functional as F
from tokenmill import ops_composite

from bench.common import table, time_call

SHAPES = {"SmolLM2-135M": (9, 3, 64, 576, 1536), "Llama-3-8B": (32, 8, 128, 4096, 14336)}


def bench(fn):
    return time_call(fn, device=torch.get_default_device().type)


def copy_bandwidth() -> float:
    a = torch.empty(256 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    a.fill_(1)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e9


def scattered_cache(seqs, length, kv_heads, head_size, dtype, block=16):
    """K/V caches holding `length` tokens of each sequence in shuffled blocks, the block
    tables, and a gather of the sequences into [seqs, kv_heads, length, head_size]."""
    blocks_per_seq = length // block
    num_blocks = seqs * blocks_per_seq
    kc = torch.randn(num_blocks, kv_heads, block, head_size, dtype=dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks, dtype=torch.int32).view(seqs, blocks_per_seq)

    def gather():
        idx = tables.long()
        shape = (seqs, kv_heads, length, head_size)
        return (c[idx].permute(0, 2, 1, 3, 4).reshape(shape) for c in (kc, vc))

    return kc, vc, tables, gather


def decode_attention_case(heads, kv_heads, head_size, dtype, seqs=256, ctx=512):
    """Every sequence decodes one token over ctx tokens of context in scattered blocks."""
    kc, vc, tables, gather = scattered_cache(seqs, ctx, kv_heads, head_size, dtype)
    q = torch.randn(seqs, heads, head_size, dtype=dtype)
    out = torch.empty_like(q)
    seq_lens = torch.full((seqs,), ctx, dtype=torch.int32)
    qsl = torch.arange(seqs + 1, dtype=torch.int32)
    scale = head_size**-0.5

    def native():
        ops.paged_attention(out, q, kc, vc, tables, seq_lens, qsl, scale)

    def composite():  # gather every sequence's blocks, then SDPA with GQA
        k, v = gather()
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)

    got = torch.empty_like(q)
    ops.paged_attention(got, q, kc, vc, tables, seq_lens, qsl, scale)
    ref = composite()[:, :, 0]
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 2e-2
    kv_bytes = 2 * kc.numel() * kc.element_size()
    return bench(native), bench(composite), kv_bytes


def prefill_attention_case(heads, kv_heads, head_size, dtype, seqs=4, length=512):
    """Every sequence prefills `length` new tokens (causal) from scattered blocks."""
    kc, vc, tables, gather = scattered_cache(seqs, length, kv_heads, head_size, dtype)
    q = torch.randn(seqs * length, heads, head_size, dtype=dtype)
    out = torch.empty_like(q)
    seq_lens = torch.full((seqs,), length, dtype=torch.int32)
    qsl = torch.arange(seqs + 1, dtype=torch.int32) * length
    scale = head_size**-0.5

    def native():
        ops.paged_attention(out, q, kc, vc, tables, seq_lens, qsl, scale)

    def composite():  # gather every sequence's blocks, then causal SDPA with GQA
        k, v = gather()
        qs = q.view(seqs, length, heads, head_size).transpose(1, 2)
        return F.scaled_dot_product_attention(
            qs, k, v, scale=scale, is_causal=True, enable_gqa=True
        )

    native()
    ref = composite().transpose(1, 2).reshape(out.shape)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 2e-2
    flops = 4 * seqs * heads * head_size * length * (length + 1) / 2
    return bench(native), bench(composite), flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="model shapes, comma-separated")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(f"{where}, dtype {args.dtype}, large-copy bandwidth {bw:.1f} GB/s\n")

    rows = []
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    for name, (h, kvh, d, hidden, inter) in shapes.items():
        nat, comp, nbytes = decode_attention_case(h, kvh, d, dtype)
        gbs = nbytes / nat / 1e9
        rows.append(
            [
                f"{name} decode attention 256x512",
                nat * 1e3,
                comp * 1e3,
                comp / nat,
                f"{gbs:.1f} GB/s ({100 * gbs / bw:.0f}%)",
            ]
        )
        nat, comp, flops = prefill_attention_case(h, kvh, d, dtype)
        rows.append(
            [
                f"{name} prefill attention 4x512",
                nat * 1e3,
                comp * 1e3,
                comp / nat,
                f"{flops / nat / 1e12:.2f} TFLOPS",
            ]
        )

        for tokens in (256, 2048):
            x = torch.randn(tokens, hidden, dtype=dtype)
            w = torch.randn(hidden, dtype=dtype)
            out = torch.empty_like(x)
            rows.append(
                [
                    f"{name} rms_norm {tokens}x{hidden}",
                    bench(lambda: ops.rms_norm(out, x, w, 1e-5)) * 1e3,
                    bench(lambda: ops_composite.rms_norm(out, x, w, 1e-5)) * 1e3,
                ]
            )
            res = torch.randn_like(x)
            rows.append(
                [
                    f"{name} fused_add_rms_norm {tokens}",
                    bench(lambda: ops.fused_add_rms_norm(x, res, w, 1e-5)) * 1e3,
                    bench(lambda: ops_composite.fused_add_rms_norm(x, res, w, 1e-5)) * 1e3,
                ]
            )
            gu = torch.randn(tokens, 2 * inter, dtype=dtype)
            act = torch.empty(tokens, inter, dtype=dtype)
            rows.append(
                [
                    f"{name} silu_and_mul {tokens}x{inter}",
                    bench(lambda: ops.silu_and_mul(act, gu)) * 1e3,
                    bench(lambda: ops_composite.silu_and_mul(act, gu)) * 1e3,
                ]
            )
            qkv = torch.randn(tokens, (h + 2 * kvh) * d, dtype=dtype)
            q, k = qkv[:, : h * d], qkv[:, h * d : (h + kvh) * d]
            pos = torch.randint(0, 4096, (tokens,), dtype=torch.int32)
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            f = torch.outer(torch.arange(4096).float(), inv)
            cs = torch.cat([f.cos(), f.sin()], -1)
            rows.append(
                [
                    f"{name} rotary {tokens}",
                    bench(lambda: ops.rotary_embedding(pos, q, k, d, cs, True)) * 1e3,
                    bench(lambda: ops_composite.rotary_embedding(pos, q, k, d, cs, True)) * 1e3,
                ]
            )
            kc = torch.zeros(tokens // 16 + 1, kvh, 16, d, dtype=dtype)
            vc = torch.zeros_like(kc)
            kk, vv = (
                torch.randn(tokens, kvh * d, dtype=dtype),
                torch.randn(tokens, kvh * d, dtype=dtype),
            )
            slots = torch.randperm(kc.shape[0] * 16)[:tokens].to(torch.int32)
            rows.append(
                [
                    f"{name} reshape_and_cache {tokens}",
                    bench(lambda: ops.reshape_and_cache(kk, vv, kc, vc, slots)) * 1e3,
                    bench(lambda: ops_composite.reshape_and_cache(kk, vv, kc, vc, slots)) * 1e3,
                ]
            )
    for r in rows:
        if len(r) == 3:
            r += [r[2] / r[1], ""]
    print(table(rows, ["kernel", "tokenmill ms", "torch composite ms", "speed-up", "achieved"]))


if __name__ == "__main__":
    main()
