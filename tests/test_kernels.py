"""Every op on every backend against a naive float64 reference.

Backends: the native kernels on each device present, the GPU kernels run on
the host by their emulation (cuda/emulation/), and the torch composite (the
path for devices without native kernels).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenmill.ops as native
import torch
from tokenmill import ops_composite as composite

from tests.conftest import CUDA_MARKS, EMULATED_GPU_MARKS, emulated_gpu_ops

BACKENDS = [
    pytest.param((native, "cpu"), id="native-cpu"),
    pytest.param((composite, "cpu"), id="composite-cpu"),
]
BACKENDS.append(pytest.param((native, "cuda"), id="native-cuda", marks=CUDA_MARKS))
BACKENDS.append(pytest.param(("emulated-gpu", "cpu"), id="emulated-gpu", marks=EMULATED_GPU_MARKS))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def needs(backend, op):
    impl, device = backend
    if (device == "cuda" or impl == "emulated-gpu") and op == "linear":
        pytest.skip("dense layers run on cuBLAS on CUDA; tokenmill's linear is CPU-only")
    if impl == "emulated-gpu":
        impl = emulated_gpu_ops()
    return impl, device


# ---------------------------------------------------------------- references


def ref_attention(
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    qsl,
    scale,
    window=0,
    softcap=0.0,
    alibi=None,
    sinks=None,
):
    q = query.double().cpu()
    kc, vc = key_cache.double().cpu(), value_cache.double().cpu()
    num_kv, block_size, head_size = kc.shape[1:]
    out = torch.zeros_like(q)
    group = q.shape[1] // num_kv
    for s in range(len(seq_lens)):
        ctx = int(seq_lens[s])
        start, end = int(qsl[s]), int(qsl[s + 1])
        keys = torch.stack(
            [kc[block_tables[s, p // block_size], :, p % block_size] for p in range(ctx)]
        )
        vals = torch.stack(
            [vc[block_tables[s, p // block_size], :, p % block_size] for p in range(ctx)]
        )
        for i, t in enumerate(range(start, end)):
            pos = ctx - (end - start) + i
            for h in range(q.shape[1]):
                lo = max(0, pos - window + 1) if window else 0
                k = keys[lo : pos + 1, h // group]
                v = vals[lo : pos + 1, h // group]
                sc = k @ q[t, h] * scale
                if softcap:
                    sc = softcap * torch.tanh(sc / softcap)
                if alibi is not None:
                    sc = sc + alibi[h].double() * (
                        torch.arange(lo, pos + 1, dtype=torch.float64) - pos
                    )
                if sinks is not None:
                    sc = torch.cat([sc, sinks[h].double().reshape(1)])
                    out[t, h] = torch.softmax(sc, 0)[:-1] @ v
                else:
                    out[t, h] = torch.softmax(sc, 0) @ v
    return out


def ref_rms(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def ref_rotary(x, positions, cos_sin, head_size, neox):
    x = x.double().clone().view(x.shape[0], -1, head_size)
    rot = cos_sin.shape[1]
    for t in range(x.shape[0]):
        cos, sin = cos_sin[positions[t]].double().chunk(2)
        for h in range(x.shape[1]):
            v = x[t, h, :rot].clone()
            for i in range(rot // 2):
                a, b = (i, i + rot // 2) if neox else (2 * i, 2 * i + 1)
                x[t, h, a] = v[a] * cos[i] - v[b] * sin[i]
                x[t, h, b] = v[b] * cos[i] + v[a] * sin[i]
    return x


# ------------------------------------------------------------------- caches


def make_cache(num_blocks, num_kv, block_size, head_size, dtype, device):
    shape = (num_blocks, num_kv, block_size, head_size)
    return (
        torch.randn(shape, dtype=dtype, device=device),
        torch.randn(shape, dtype=dtype, device=device),
    )


def random_tables(seq_lens, block_size, num_blocks, gen):
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + 2
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n]
        used += n
    return tables


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache(backend, dtype, block_size):
    impl, device = needs(backend, "reshape_and_cache")
    num_kv, head_size, tokens = 3, 64, 37
    kc, vc = make_cache(8, num_kv, block_size, head_size, dtype, device)
    kc0, vc0 = kc.clone(), vc.clone()
    qkv = torch.randn(tokens, (2 + 2 * num_kv) * head_size, dtype=dtype, device=device)
    key = qkv[:, 2 * head_size : (2 + num_kv) * head_size]  # strided views, as after a QKV split
    value = qkv[:, (2 + num_kv) * head_size :]
    slots = torch.randperm(8 * block_size)[:tokens].to(torch.int32)
    slots[::5] = -1  # padding
    impl.reshape_and_cache(key, value, kc, vc, slots.to(device))
    ref_k, ref_v = kc0.clone(), vc0.clone()
    for t in range(tokens):
        s = int(slots[t])
        if s >= 0:
            ref_k[s // block_size, :, s % block_size] = key[t].view(num_kv, head_size)
            ref_v[s // block_size, :, s % block_size] = value[t].view(num_kv, head_size)
    torch.testing.assert_close(kc, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(vc, ref_v, rtol=0, atol=0)


ATTN_CASES = [
    # (num_heads, num_kv_heads, head_size, [(query_len, context_len), ...])
    (4, 4, 64, [(1, 1), (1, 16), (1, 17), (1, 300)]),  # decode only
    (9, 3, 64, [(7, 7), (16, 16), (17, 17), (1, 40)]),  # prefill mixed with decode
    (8, 2, 80, [(5, 40), (1, 33), (33, 33)]),  # chunked prefill on a cached prefix
    (8, 1, 96, [(20, 64), (1, 2)]),  # MQA
    (4, 2, 128, [(3, 50), (1, 129)]),
    (2, 1, 256, [(9, 9), (1, 31)]),
    (8, 2, 128, [(1, 1500), (1, 700), (3, 900)]),  # long contexts: split on the GPU
    # many decode sequences beside a prefill: CPU items take all heads of a sequence
    (12, 3, 64, [(1, n) for n in (1, 15, 16, 17, 31, 64, 65, 200, 90)] + [(5, 20)]),
    # ... over several rounds of scores (256 keys) each
    (8, 2, 128, [(1, n) for n in (300, 530, 17, 256, 257, 700, 90, 513, 1)]),
]


class AttentionBatch:
    """A paged-attention batch of (query_len, context_len) sequences over a
    random cache and random block tables, with a poisoned output."""

    def __init__(self, seqs, heads, block_size, dtype, device, seed=0):
        num_heads, num_kv, head_size = heads
        self.seq_lens = [c for _, c in seqs]
        self.qsl = [0]
        for q, _ in seqs:
            self.qsl.append(self.qsl[-1] + q)
        num_blocks = sum((n + block_size - 1) // block_size for n in self.seq_lens) + 4
        self.kc, self.vc = make_cache(num_blocks, num_kv, block_size, head_size, dtype, device)
        gen = torch.Generator().manual_seed(seed)
        self.tables = random_tables(self.seq_lens, block_size, num_blocks, gen)
        self.query = torch.randn(self.qsl[-1], num_heads, head_size, dtype=dtype, device=device)
        self.out = poisoned(self.query.shape, dtype, device)
        self.device = device

    def run(self, impl, scale, **kw) -> torch.Tensor:
        lens, qsl = (
            torch.tensor(x, dtype=torch.int32, device=self.device)
            for x in (self.seq_lens, self.qsl)
        )
        impl.paged_attention(
            self.out,
            self.query,
            self.kc,
            self.vc,
            self.tables.to(self.device),
            lens,
            qsl,
            scale,
            **kw,
        )
        return self.out

    def reference(self, scale, **kw) -> torch.Tensor:
        return ref_attention(
            self.query, self.kc, self.vc, self.tables, self.seq_lens, self.qsl, scale, **kw
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}")
def test_paged_attention(backend, dtype, block_size, case):
    impl, device = needs(backend, "paged_attention")
    num_heads, num_kv, head_size, seqs = case
    batch = AttentionBatch(seqs, case[:3], block_size, dtype, device)
    scale = 1 / math.sqrt(head_size)
    out = batch.run(impl, scale)
    assert torch.isfinite(out).all(), "some outputs were not written"
    assert rel_err(out, batch.reference(scale)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["window", "softcap", "alibi", "sinks", "sinks-window"])
def test_paged_attention_variants(backend, dtype, variant):
    impl, device = needs(backend, "paged_attention")
    num_heads = 4
    batch = AttentionBatch([(10, 50), (1, 70), (24, 24)], (num_heads, 2, 64), 16, dtype, device, 1)
    kw = {
        "window": dict(window=19),
        "softcap": dict(softcap=2.0),
        "alibi": dict(alibi=torch.rand(num_heads)),
        "sinks": dict(sinks=torch.randn(num_heads) * 3),
        "sinks-window": dict(sinks=torch.randn(num_heads) * 3, window=19),
    }[variant]
    call = dict(
        sliding_window=kw.get("window", 0),
        softcap=kw.get("softcap", 0.0),
        alibi_slopes=kw.get("alibi"),
        sinks=None if "sinks" not in kw else kw["sinks"].to(device),
    )
    out = batch.run(impl, 0.125, **call)
    assert rel_err(out, batch.reference(0.125, **kw)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 128), (4, 1, 256)])
@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_paged_attention_one_long_decode(backend, dtype, heads, window, with_sinks):
    """A lone decode sequence over a long context: threads split its context (parts wholly
    outside the sliding window included) and merge the parts."""
    impl, device = needs(backend, "paged_attention")
    num_heads, num_kv, head_size = heads
    block_size, context = 16, 1000
    num_blocks = context // block_size + 8
    kc, vc = make_cache(num_blocks, num_kv, block_size, head_size, dtype, device)
    tables = random_tables([context], block_size, num_blocks, torch.Generator().manual_seed(2))
    query = torch.randn(1, num_heads, head_size, dtype=dtype, device=device)
    out = poisoned(query.shape, dtype, device)
    args = [torch.tensor(x, dtype=torch.int32, device=device) for x in ([context], [0, 1])]
    sinks = torch.randn(num_heads) * 3 if with_sinks else None
    impl.paged_attention(
        out, query, kc, vc, tables.to(device), *args, 0.1, sliding_window=window,
        sinks=None if sinks is None else sinks.to(device),
    )  # fmt: skip
    ref = ref_attention(query, kc, vc, tables, [context], [0, 1], 0.1, window=window, sinks=sinks)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", [40, 700])
def test_paged_attention_verifies_drafts_as_decode_steps(backend, dtype, context):
    """Decoding sequences (num_decode_seqs) with several query tokens, a
    token and its drafts, beside a prompt: against float64, and on the CPU
    each token's output is bitwise the output of a decode step of that token
    alone (so speculative decoding changes no greedy token)."""
    native_cpu = backend == (native, "cpu")
    impl, device = needs(backend, "paged_attention")
    seqs = [(6, context), (1, 90), (4, context // 2), (30, 30)]  # 3 decoding, then a prompt
    batch = AttentionBatch(seqs, (9, 3, 64), 16, dtype, device, seed=3)
    out = batch.run(impl, 0.1, num_decode_seqs=3)
    assert rel_err(out, batch.reference(0.1)) < TOL[dtype]
    if not native_cpu:  # the bitwise property is the CPU kernels' (the GPU's: to come)
        return
    query, kc, vc, tables, qsl = batch.query, batch.kc, batch.vc, batch.tables, batch.qsl
    for s, (q_len, ctx) in enumerate(seqs[:3]):
        for r in range(q_len):
            row = qsl[s] + r
            alone = poisoned((1, *query.shape[1:]), dtype, device)
            lens = torch.tensor([ctx - q_len + r + 1], dtype=torch.int32)
            impl.paged_attention(
                alone, query[row : row + 1], kc, vc, tables[s : s + 1], lens,
                torch.tensor([0, 1], dtype=torch.int32), 0.1, num_decode_seqs=1,
            )  # fmt: skip
            assert torch.equal(alone[0], out[row]), (s, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cpu_decode_rows_do_not_depend_on_the_batch(dtype, block_size):
    """A decode row's output on the CPU is bitwise the same alone and in a
    batch (one whose size changes how the kernel splits its work), short and
    long contexts alike: batch-invariant greedy decoding rests on it."""
    contexts = [1, 17, 300, 511, 512, 513, 900, 1300, 64, 2000]
    seqs = [(1, c) for c in contexts] + [(40, 40)]  # and a prompt chunk
    batch = AttentionBatch(seqs, (9, 3, 64), block_size, dtype, "cpu", seed=4)
    out = batch.run(native, 0.1, num_decode_seqs=len(contexts))
    query, kc, vc, tables = batch.query, batch.kc, batch.vc, batch.tables
    for s, ctx in enumerate(contexts):
        alone = poisoned((1, *query.shape[1:]), dtype, "cpu")
        native.paged_attention(
            alone, query[s : s + 1], kc, vc, tables[s : s + 1],
            torch.tensor([ctx], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 0.1,
        )  # fmt: skip
        assert torch.equal(alone[0], out[s]), ctx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (33, 4096)])
def test_rms_norm(backend, dtype, shape):
    impl, device = needs(backend, "rms_norm")
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    out = poisoned(shape, dtype, device)
    impl.rms_norm(out, x, w, 1e-5)
    assert rel_err(out, ref_rms(x, w, 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_rms_norm_per_head_of_fused_rows(backend, dtype, tokens):
    # q/k norms: the heads of q inside a fused QKV output, whose rows are wider than q
    impl, device = needs(backend, "rms_norm")
    heads, head_size = 6, 64
    qkv = torch.randn(tokens, (heads + 4) * head_size, dtype=dtype, device=device)
    q = qkv[:, : heads * head_size].view(tokens, heads, head_size)
    w = torch.randn(head_size, dtype=dtype, device=device)
    out = poisoned(q.shape, dtype, device)
    impl.rms_norm(out, q, w, 1e-6)
    assert rel_err(out, ref_rms(q, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(backend, dtype):
    impl, device = needs(backend, "fused_add_rms_norm")
    x = torch.randn(13, 576, dtype=dtype, device=device)
    res = torch.randn(13, 576, dtype=dtype, device=device)
    w = torch.randn(576, dtype=dtype, device=device)
    ref_res = x.double() + res.double()
    ref = ref_rms(ref_res, w, 1e-6)
    impl.fused_add_rms_norm(x, res, w, 1e-6)
    assert rel_err(res, ref_res) < TOL[dtype]
    assert rel_err(x, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary_embedding(backend, dtype, neox, rot_dim):
    impl, device = needs(backend, "rotary_embedding")
    head_size, nh, nkv, tokens = 64, 4, 2, 11
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(100).float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
    positions = torch.randint(0, 100, (tokens,), dtype=torch.int32)
    qkv = torch.randn(tokens, (nh + 2 * nkv) * head_size, dtype=dtype, device=device)
    q, k = qkv[:, : nh * head_size], qkv[:, nh * head_size : (nh + nkv) * head_size]
    ref_q = ref_rotary(q.cpu(), positions, cos_sin.cpu(), head_size, neox)
    ref_k = ref_rotary(k.cpu(), positions, cos_sin.cpu(), head_size, neox)
    impl.rotary_embedding(positions.to(device), q, k, head_size, cos_sin, neox)
    assert rel_err(q.reshape(ref_q.shape), ref_q) < TOL[dtype]
    assert rel_err(k.reshape(ref_k.shape), ref_k) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_act_and_mul(backend, dtype, act):
    impl, device = needs(backend, "silu_and_mul")
    x = torch.randn(19, 2 * 1536, dtype=dtype, device=device)
    out = poisoned((19, 1536), dtype, device)
    a, b = x[:, :1536].double(), x[:, 1536:].double()
    if act == "silu":
        impl.silu_and_mul(out, x)
        ref = a * torch.sigmoid(a) * b
    else:
        tanh = act == "gelu_tanh"
        impl.gelu_and_mul(out, x, tanh)
        ref = torch.nn.functional.gelu(a, approximate="tanh" if tanh else "none") * b
    assert rel_err(out, ref) < TOL[dtype]


def ref_moe(x, w13, w2, weights, ids, act, b13=None, b2=None, alpha=0.0, limit=0.0):
    x, w13, w2 = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w13[e] @ x[t] + (0 if b13 is None else b13[e].double().cpu())
            gate, up = gate_up[:inter], gate_up[inter:]
            if act == 2:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
                h = (up + 1) * gate * torch.sigmoid(alpha * gate)
            elif act == 0:
                h = gate * torch.sigmoid(gate) * up
            else:
                h = torch.nn.functional.gelu(gate, approximate="tanh") * up
            y = w2[e] @ h + (0 if b2 is None else b2[e].double().cpu())
            out[t] += float(weights[t, j]) * y
    return out


MOE_CASES = {
    "decode": (1, 8, 2, 64, 96),
    "all-experts": (5, 8, 8, 128, 64),
    "one-expert-each": (16, 16, 1, 64, 32),
    "batch": (24, 8, 2, 96, 48),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(MOE_CASES))
@pytest.mark.parametrize("act", [0, 1, 2], ids=["silu", "gelu_tanh", "swiglu_oai"])
def test_fused_moe(backend, dtype, case, act):
    impl, device = needs(backend, "fused_moe")
    if impl is native and device == "cpu" and dtype == torch.float16:
        pytest.skip(
            "the CPU MoE kernel takes float32 or bfloat16 weights (float16 runs the composite)"
        )
    tokens, experts, top_k, hidden, inter = MOE_CASES[case]
    g = torch.Generator().manual_seed(tokens * 31 + act)
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(device)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    if case == "one-expert-each":
        ids = torch.randperm(experts, generator=g)[:tokens, None]
    else:
        ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    biases = {}
    if act == 2:
        biases = dict(
            w13_bias=torch.randn(experts, 2 * inter, generator=g).to(device),
            w2_bias=torch.randn(experts, hidden, generator=g).to(device),
            swiglu_alpha=1.702,
            swiglu_limit=1.5,
        )
    out = poisoned((tokens, hidden), dtype, device)
    impl.fused_moe(
        out,
        x,
        w13.to(device),
        w2.to(device),
        weights.to(device),
        ids.to(torch.int32).to(device),
        act,
        **biases,
    )
    ref = ref_moe(
        x,
        w13,
        w2,
        weights,
        ids,
        act,
        biases.get("w13_bias"),
        biases.get("w2_bias"),
        biases.get("swiglu_alpha", 0.0),
        biases.get("swiglu_limit", 0.0),
    )
    assert rel_err(out, ref) < TOL[dtype] * 2


def test_fused_moe_rejects_bad_routing():
    x = torch.randn(2, 64)
    w13, w2 = torch.randn(4, 64, 64), torch.randn(4, 64, 32)
    ids = torch.tensor([[0], [4]], dtype=torch.int32)
    with pytest.raises(Exception, match="expert id"):
        native.fused_moe(torch.empty_like(x), x, w13, w2, torch.ones(2, 1), ids, 0)
    with pytest.raises(Exception, match="topk_ids"):
        native.fused_moe(torch.empty_like(x), x, w13, w2, torch.ones(2, 1), ids.long(), 0)


GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}
K_TYPES = {"Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def random_k_quant(n: int, k: int, ggml: int, rng: torch.Generator) -> np.ndarray:
    """Random K-quant super-blocks with small float16 scales (the gguf
    package dequantizes these types but cannot quantize to them)."""
    size = {12: 144, 13: 176, 14: 210}[ggml]
    b = torch.randint(0, 256, (n * k // 256, size), generator=rng, dtype=torch.uint8).numpy()
    scales = (torch.rand(b.shape[0], 2, generator=rng) * 0.01).numpy().astype(np.float16)
    if ggml == 14:
        b[:, 208:210] = scales[:, :1].view(np.uint8)
    else:
        b[:, 0:4] = scales.view(np.uint8)
    return b.reshape(n, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", [*GGUF_TYPES, *K_TYPES])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_blocks(backend, qtype, m, dtype):
    """GGUF block weights as stored: dequantized exactly as the gguf package
    does, and products against its dequantized weights in float64."""
    gguf = pytest.importorskip("gguf.quants")
    gpu = backend[0] == "emulated-gpu" or backend[1] == "cuda"
    if qtype in K_TYPES and not gpu:
        pytest.skip("K types run packed on CPUs (test_gguf_packed_blocks)")
    impl, device = needs(backend, "gguf_linear")
    rng = torch.Generator().manual_seed(m)
    n, k = 96, 512 if qtype in K_TYPES else 320
    if qtype in K_TYPES:
        ggml = K_TYPES[qtype]
        blocks = random_k_quant(n, k, ggml, rng)
    else:
        ggml = GGUF_TYPES[qtype]
        blocks = gguf.quantize((torch.randn(n, k, generator=rng) * 0.05).numpy(), ggml)
    ref_w = torch.from_numpy(gguf.dequantize(blocks, ggml)).double()
    q = torch.from_numpy(blocks.copy()).to(device)
    rows = poisoned((40, k), torch.float32, device)
    impl.gguf_dequantize(rows, q, ggml, 50)
    assert torch.equal(rows.cpu().double(), ref_w[50:90])
    if gpu:  # tiles for the BLAS in the activations' dtype
        rows = poisoned((40, k), dtype, device)
        impl.gguf_dequantize(rows, q, ggml, 50)
        assert torch.equal(rows.cpu(), ref_w[50:90].to(dtype))
    x = torch.randn(m, k, generator=rng).to(dtype).to(device)
    ref = x.double().cpu() @ ref_w.t()
    out = poisoned((m, n), dtype, device)
    impl.gguf_linear(out, x, q, ggml)
    assert rel_err(out, ref) < TOL[dtype]


PACKED_GROUP_BYTES = {"Q4_0": 144, "Q4_1": 160, "Q5_0": 176, "Q8_0": 272}


@pytest.mark.parametrize("qtype", [*PACKED_GROUP_BYTES, *K_TYPES])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_packed_blocks(qtype, m, dtype):
    """Q4_0, Q4_1, Q5_0, Q8_0 and the K types repacked in groups of eight rows
    (97 rows: a group with one row): lookups exactly the gguf package's
    dequantized rows, products against them in float64, with llama.cpp's
    8-bit activations where the CPU has the integer path and exactly where it
    does not (14-bit ones for logits); strided rows in and out."""
    gguf = pytest.importorskip("gguf.quants")
    from tokenmill.layers.gguf_linear import GGUFBlocks

    rng = torch.Generator().manual_seed(m)
    n = 97
    if qtype in K_TYPES:
        k, ggml = 512, K_TYPES[qtype]
        blocks = random_k_quant(n, k, ggml, rng)
        packed = GGUFBlocks(torch.from_numpy(blocks), ggml, k).packed()
    else:
        k, ggml = 320, GGUF_TYPES[qtype]
        blocks = gguf.quantize((torch.randn(n, k, generator=rng) * 0.05).numpy(), ggml)
        packed = torch.full((13, PACKED_GROUP_BYTES[qtype] * k // 32), 0xAB, dtype=torch.uint8)
        native.gguf_pack(packed, torch.from_numpy(blocks.copy()), ggml, k)
    ref_w = torch.from_numpy(gguf.dequantize(blocks, ggml)).double()
    ids = torch.tensor([96, 0, 5, 5, 50])
    rows = poisoned((5, k), dtype, "cpu")
    native.gguf_packed_rows(rows, ids, packed, ggml, n)
    assert torch.equal(rows, ref_w[ids].to(dtype))
    x = torch.randn(m, k + 32, generator=rng).to(dtype)[:, 16 : 16 + k]  # rows k + 32 apart
    ref = x.double() @ ref_w.t()
    integer = "avx2" in _cpu_flags() and not os.environ.get("TOKENMILL_DISABLE_AVX2")
    for out_dtype, bits in ((dtype, 8), (torch.float32, 8), (torch.float32, 14)):
        wide = poisoned((m, n + 7), out_dtype, "cpu")
        out = wide[:, 3 : 3 + n]
        native.gguf_packed_linear(out, x, packed, ggml, bits)
        assert torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 3 + n :]).all()
        if integer and bits == 8:
            assert 1e-4 < rel_err(out, ref) < 2e-2  # rounded activations, as llama.cpp's
        elif integer:  # 14-bit activations, for logits
            assert 1e-6 < rel_err(out, ref) < 5e-4
        else:
            assert rel_err(out, ref) < TOL[out_dtype]
    with pytest.raises(RuntimeError, match="activation_bits"):
        native.gguf_packed_linear(out, x, packed, ggml, 4)
    with pytest.raises(RuntimeError, match="outside"):
        native.gguf_packed_rows(rows[:1], torch.tensor([n]), packed, ggml, n)


def test_ops_reject_bad_dtypes():
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.rms_norm(torch.empty_like(x), x, torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="int32"):
        kc = torch.zeros(2, 1, 16, 8)
        native.reshape_and_cache(
            torch.randn(1, 8), torch.randn(1, 8), kc, kc.clone(), torch.zeros(1, dtype=torch.int64)
        )


def test_ops_trace_under_torch_compile():
    def f(x, w):
        out = torch.empty_like(x)
        torch.ops.tokenmill.rms_norm(out, x, w, 1e-6)
        return out * 2

    x, w = torch.randn(4, 64), torch.randn(64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w))


@pytest.mark.parametrize(
    "dtype,wdtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 64, 7),
        (1, 100, 9),
        (1, 16, 5),
        (1, 576, 3072),
        (2, 100, 37),
        (2, 70, 13),
        (3, 576, 97),
        (4, 64, 9),
        (5, 576, 960),
        (7, 128, 40),
        (9, 96, 21),
        (16, 100, 33),
        (32, 1536, 576),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(dtype, wdtype, m, k, n, bias):
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=wdtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    out = poisoned((m, n), dtype, "cpu")
    torch.ops.tokenmill.linear(out, x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert rel_err(out, ref) < TOL[dtype]


def test_linear_layer_paths_agree():
    from tokenmill.cpu_policy import SMALL_M, small_m
    from tokenmill.layers.linear import linear

    w = torch.randn(1100, 64, dtype=torch.bfloat16)  # more rows than one float32 tile
    b = torch.randn(1100, dtype=torch.bfloat16)
    threshold = small_m(w.dtype)
    for m in sorted({1, threshold, threshold + 1, SMALL_M, SMALL_M + 1, 700}):
        x = torch.randn(m, 64, dtype=torch.bfloat16)
        ref = x.double() @ w.double().T
        got = linear(x, w)
        assert got.is_contiguous() and rel_err(got, ref) < 1e-2
        assert rel_err(linear(x, w, b), ref + b.double()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_plain_results(dtype):
    from tokenmill.cpu_policy import SMALL_M_NATIVE_BF16, SMALL_M_PACKED
    from tokenmill.layers.linear import linear, pack_weights

    w = torch.randn(300, 96, dtype=dtype)
    b = torch.randn(300, dtype=dtype)
    pack_weights([w])
    if not hasattr(w, "onednn_packed"):
        pytest.skip("this torch or CPU has no oneDNN packed matmul for this dtype")
    edges = (SMALL_M_NATIVE_BF16, SMALL_M_PACKED)
    for m in sorted({1, 257, *edges, *(m + 1 for m in edges)}):
        x = torch.randn(m, 96, dtype=dtype)
        ref = x.double() @ w.double().T + b.double()
        got = linear(x, w, b)
        assert got.shape == (m, 300) and got.dtype == dtype
        assert rel_err(got, ref) < TOL[dtype]


def weight_with_escapes(n, k):
    """A bfloat16 weight whose high bytes are too many for a 16-entry table:
    normal values, and a few far outside their range (escapes) and signed zeros.
    Its own generator: whether a small weight has escapes must not depend on
    which tests ran before."""
    g = torch.Generator().manual_seed(n * 100003 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    far = torch.tensor([3e4, -2e-20, 1e-30, 65504.0, -7.5])
    picks = torch.randperm(n * k, generator=g)[: max(5, n * k // 500)]
    w.view(-1)[picks] = far[torch.arange(len(picks)) % len(far)]
    w[0, :2] = torch.tensor([0.0, -0.0])
    return w.bfloat16()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 64, 7),
        (1, 576, 960),
        (2, 1536, 33),
        (3, 128, 65),
        (4, 64, 9),
        (5, 576, 70),
        (9, 128, 33),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_coded_linear(dtype, m, k, n, bias):
    from tokenmill.layers.coded import code_bf16, coded_linear

    w = weight_with_escapes(n, k)
    coded = code_bf16(w)
    assert coded.escape_values.numel() > 0 and coded.table[0] == 0
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert rel_err(coded_linear(x, coded, b), ref) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
def test_coded_weights_hold_every_value_exactly(m):
    """Rows of the identity read the weight back column by column, bit for bit."""
    from tokenmill.layers.coded import code_bf16, coded_linear

    w = weight_with_escapes(40, 128)
    coded = code_bf16(w)
    eye = torch.eye(128)
    columns = torch.cat([coded_linear(eye[i : i + m], coded) for i in range(0, 128, m)])[:128]
    assert torch.equal(columns.T, w.float())


def test_code_bf16_rejects_what_it_cannot_code():
    from tokenmill.layers.coded import code_bf16

    with pytest.raises(ValueError, match="cannot code"):
        code_bf16(torch.randn(8, 64))
    with pytest.raises(ValueError, match="cannot code"):
        code_bf16(torch.randn(8, 96, dtype=torch.bfloat16))


def test_decode_rows_take_the_coded_weight():
    import tokenmill.layers.linear as tl

    w = weight_with_escapes(300, 128)
    b = torch.randn(300, dtype=torch.bfloat16)
    tl.pack_weights([w])
    if not tl.cpu_has_avx2():
        assert not hasattr(w, "coded_bf16")
        pytest.skip("this CPU has no coded kernel")
    assert hasattr(w, "coded_bf16")
    for m in (1, tl.CODED_M, tl.CODED_M + 1):
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        assert rel_err(tl.linear(x, w, b), x.double() @ w.double().T + b.double()) < 1e-2


def test_bf16_weights_packed_as_float32_where_the_cpu_lacks_bf16(monkeypatch):
    import tokenmill.cpu_policy
    import tokenmill.layers.linear as tl

    monkeypatch.setattr(tokenmill.cpu_policy, "cpu_has_native_bf16", lambda: False)
    w = torch.randn(300, 96, dtype=torch.bfloat16)
    b = torch.randn(300, dtype=torch.bfloat16)
    tl.pack_weights([w])
    if not hasattr(w, "onednn_packed"):
        pytest.skip("this torch has no oneDNN packed matmul")
    assert w.onednn_packed.dtype == torch.float32
    for m in (tokenmill.cpu_policy.SMALL_M_PACKED + 1, 257):
        x = torch.randn(m, 96, dtype=torch.bfloat16)
        # float32 accumulation of exact products, rounded once to bf16
        ref = (x.double() @ w.double().T + b.double()).float().bfloat16()
        got = tl.linear(x, w, b)
        assert got.dtype == torch.bfloat16 and got.shape == (m, 300)
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-3)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.parametrize("switch", ["TOKENMILL_DISABLE_AVX2", "TOKENMILL_DISABLE_AVX512"])
def test_fallback_paths_give_the_same_results(switch):
    """The kernels' paths for CPUs without AVX2 (portable) or without AVX-512
    bfloat16 (AVX2) pass the same tests on CPUs that would take faster ones."""
    if os.environ.get(switch) or os.environ.get("TOKENMILL_DISABLE_AVX2"):
        pytest.skip(f"already running with {switch}")
    if switch == "TOKENMILL_DISABLE_AVX512" and "avx512_bf16" not in _cpu_flags():
        pytest.skip("this CPU has no AVX-512 bfloat16 paths to turn off")
    quantization = os.path.join(os.path.dirname(__file__), "test_quantization.py")
    tests = (
        "(paged_attention or linear or coded or int4_kernels or rms_norm or argmax or act_and_mul"
        " or fused_moe or gguf)"
    )
    tests += " and not emulated"
    env = dict(os.environ, **{switch: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += [__file__, quantization, "-k", tests]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 49155), (3, 7), (17, 8), (64, 1000)])
def test_argmax_rows_matches_torch(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    x = torch.randn(shape, generator=gen).to(dtype)
    m, n = shape
    if n > 4:
        x[0, n // 2] = x[0, n - 1] = x[0].max() + 1  # a tie: the first index wins
        x[-1, :] = float("-inf")
        if m > 2:
            x[1, 3] = x[1, n - 2] = float("nan")  # a NaN counts as the largest
            x[1, 0] = float("inf")
    wide = torch.empty(m + 3, n + 5, dtype=dtype)  # rows with a stride longer than n
    wide[:m, :n] = x
    for rows in (x, wide[:m, :n]):
        out = torch.full((m,), -1, dtype=torch.long)
        torch.ops.tokenmill.argmax_rows(out, rows)
        torch.testing.assert_close(out, x.argmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("impl", [native, composite], ids=["native", "composite"])
def test_apply_token_bitmask(impl):
    """-inf exactly where a masked row's bit is clear; other rows untouched."""
    rng = torch.Generator().manual_seed(0)
    n, vocab = 5, 1000  # a partial last word
    logits = torch.randn(n, vocab, generator=rng)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (n, 32), generator=rng, dtype=torch.int32)
    bitmask[1] = -1  # all allowed
    bitmask[3, :10] = 0  # none of the first 320
    rows = torch.tensor([0, 1, 3])
    got = logits.clone()
    impl.apply_token_bitmask(got, bitmask, rows)
    want = logits.clone()
    for r in rows.tolist():
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    assert torch.equal(got, want)
    assert torch.isinf(got[3, :320]).all() and torch.equal(got[1], logits[1])
    if impl is native:
        with pytest.raises(RuntimeError, match="outside"):
            impl.apply_token_bitmask(got, bitmask, torch.tensor([n]))


def test_argmax_rows_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="argmax_rows"):
        torch.ops.tokenmill.argmax_rows(torch.empty(2, dtype=torch.long), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="argmax_rows"):
        torch.ops.tokenmill.argmax_rows(torch.empty(3, dtype=torch.int32), torch.randn(3, 4))
