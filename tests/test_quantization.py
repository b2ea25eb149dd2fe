"""GPTQ and AWQ 4-bit checkpoints and the int4 kernels."""

import os

import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill import ops_composite as composite
from tokenmill.errors import UnsupportedModelError
from tokenmill.layers.quantization import (
    Int4Linear,
    QuantConfig,
    convert_awq,
    convert_gptq,
    pack_tokenmill,
)

from tests.conftest import CUDA_MARKS, EMULATED_GPU_MARKS, VOCAB, emulated_gpu_ops, hf_model
from tests.quant_utils import dequant_awq, dequant_gptq, pack_awq, pack_gptq, quantize_checkpoint


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=CUDA_MARKS),
    pytest.param("emulated-gpu", marks=EMULATED_GPU_MARKS),
]


def int4_ops(device):
    """The int4 ops and the tensors' device for a test device."""
    if device == "emulated-gpu":
        return emulated_gpu_ops(), "cpu"
    return torch.ops.tokenmill, device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 2, 3, 16, 33, 100])
@pytest.mark.parametrize(
    "k,n,group",
    [(64, 8, 32), (256, 100, 64), (512, 96, 128), (128, 24, 128), (576, 40, 128), (96, 37, 32)],
)
def test_int4_kernels_against_float64(device, m, k, n, group):
    g = torch.Generator().manual_seed(m * 7 + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    groups = -(-k // group)  # the last group may be partial
    scales = torch.rand(n, groups, generator=g) + 0.1
    zeros = torch.randn(n, groups, generator=g)
    ref_w = (
        q.double() * scales.double().repeat_interleave(group, 1)[:, :k]
        - zeros.double().repeat_interleave(group, 1)[:, :k]
    )
    x = torch.randn(m, k, generator=g)
    ops, device = int4_ops(device)
    qw, scales, zeros, x = (t.to(device) for t in (pack_tokenmill(q), scales, zeros, x))
    out = torch.full((m, n), float("nan"), device=device)
    ops.int4_linear(out, x, qw, scales, zeros, group)
    assert rel(out.cpu(), x.cpu().double() @ ref_w.t()) < 1e-5
    w = torch.full((n - 3, k), float("nan"), device=device)
    ops.int4_dequantize(w, qw, scales, zeros, group, 3)
    assert rel(w.cpu(), ref_w[3:]) < 1e-6
    wc = torch.empty_like(w)
    composite.int4_dequantize(wc, qw, scales, zeros, group, 3)
    assert rel(wc.cpu(), ref_w[3:]) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 2, 5, 70])
@pytest.mark.parametrize("k,n,group", [(576, 40, 128), (100, 24, 32), (256, 130, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_linear_reads_and_writes_half_precision_unpadded(device, m, k, n, group, dtype):
    """int4_linear takes x of the model's dtype, K unpadded, and writes out in it (on GPUs,
    above 32 rows, through the tensor-core GEMM)."""
    ops, device = int4_ops(device)
    g = torch.Generator().manual_seed(k + m)
    k_padded = -(-k // 32) * 32
    q = torch.randint(0, 16, (n, k_padded), generator=g, dtype=torch.uint8)
    groups = -(-k_padded // group)
    scales = torch.rand(n, groups, generator=g) + 0.1
    zeros = torch.randn(n, groups, generator=g)
    ref_w = (
        q.double() * scales.double().repeat_interleave(group, 1)[:, :k_padded]
        - zeros.double().repeat_interleave(group, 1)[:, :k_padded]
    )[:, :k]
    x = torch.randn(m, k, generator=g).to(dtype)
    tensors = (x, pack_tokenmill(q), scales, zeros)
    xd, qd, sd, zd = (t.to(device) for t in tensors)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    ops.int4_linear(out, xd, qd, sd, zd, group)
    assert rel(out.cpu(), x.double() @ ref_w.t()) < 1e-2
    expected = torch.empty(m, n, dtype=dtype)
    composite.int4_linear(expected, *tensors, group)
    assert rel(out.cpu(), expected.double()) < 1e-2


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_conversion_keeps_the_dequantized_weight(group, sym, desc_act):
    w = torch.randn(48, 256)
    t = pack_gptq(w, group, sym, desc_act)
    ref = dequant_gptq(t)
    conv = convert_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group)
    dense = torch.empty(48, 256)
    gs = group if group != -1 else 256
    composite.int4_dequantize(dense, conv.qweight, conv.scales, conv.zeros, gs, 0)
    if conv.perm is not None:  # stored input-sorted
        dense = dense[:, torch.argsort(conv.perm)]
    assert rel(dense, ref) < 1e-6
    assert rel(ref, w) < 0.15  # a sane 4-bit approximation


@pytest.mark.parametrize("group", [32, 128])
def test_awq_conversion_keeps_the_dequantized_weight(group):
    w = torch.randn(64, 256)
    t = pack_awq(w, group)
    ref = dequant_awq(t, group)
    conv = convert_awq(t["qweight"], t["qzeros"], t["scales"], group)
    dense = torch.empty(64, 256)
    composite.int4_dequantize(dense, conv.qweight, conv.scales, conv.zeros, group, 0)
    assert rel(dense, ref) < 1e-6 and rel(ref, w) < 0.15


@pytest.mark.parametrize("m", [1, 40])
def test_int4_linear_layer_with_shards_and_odd_sizes(m):
    quant = QuantConfig("gptq", 4, 32, desc_act=True)
    layer = Int4Linear(96, {"a": 16, "b": 24}, bias=True, quant=quant)
    refs = []
    for i, (shard, size) in enumerate([("a", 16), ("b", 24)]):
        t = pack_gptq(torch.randn(size, 96), 32, True, True, seed=i)
        for piece, tensor in t.items():
            layer.load_shard(piece, shard, tensor)
        refs.append(dequant_gptq(t))
        layer.load_shard("bias", shard, torch.randn(size))
    x = torch.randn(m, 96, dtype=torch.bfloat16)
    ref = x.double() @ torch.cat(refs).t() + layer.bias.double()
    assert rel(layer(x), ref) < 1e-2


def test_unsupported_quantization_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="GPTQ and AWQ"):
        QuantConfig.from_hf({"quant_method": "bitsandbytes"})
    with pytest.raises(UnsupportedModelError, match="bits=3"):
        QuantConfig.from_hf({"quant_method": "gptq", "bits": 3, "group_size": 128})


@pytest.mark.parametrize(
    "method,group,sym,desc_act",
    [
        ("gptq", 32, True, False),
        ("gptq", 64, False, True),
        ("gptq", -1, True, False),
        ("awq", 32, False, False),
    ],
)
def test_quantized_model_matches_its_dequantized_reference(
    tiny_model, tmp_path, method, group, sym, desc_act
):
    src = tiny_model("llama")
    dst = str(tmp_path / method)
    dequant = quantize_checkpoint(src, dst, method, group, sym, desc_act)
    ref_model = hf_model(src)
    ref_model.load_state_dict({k: v for k, v in dequant.items()}, strict=False)
    llm = LLM(dst, dtype="float32", kv_cache_memory="32MiB", enable_prefix_caching=False)
    g = torch.Generator().manual_seed(0)
    for n in (7, 40):  # decode-sized and prefill-sized batches take different kernels
        p = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        ours = llm.generate(
            [{"prompt_token_ids": p}],
            SamplingParams(temperature=0, max_tokens=8, min_tokens=8),
            use_tqdm=False,
        )
        ref = ref_model.generate(
            torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=1
        )
        assert ours[0].outputs[0].token_ids == ref[0, n:].tolist()
        from tests.test_models import prefill_logits

        got = prefill_logits(llm, [p])[0]
        with torch.no_grad():
            exp = ref_model(torch.tensor([p])).logits[0]
        assert rel(got, exp) < 1e-4


@pytest.mark.slow
def test_4bit_smollm2_is_coherent(smollm2_path, tmp_path):
    dst = str(tmp_path / "smol-gptq")
    quantize_checkpoint(smollm2_path, dst, "gptq", 128, sym=False)
    llm = LLM(dst, dtype="bfloat16", kv_cache_memory="256MiB", max_model_len=1024)
    assert isinstance(llm.engine.runner.model.model.layers[0].mlp.down_proj, Int4Linear)
    size = sum(
        os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".safetensors")
    )
    assert size < 0.5 * os.path.getsize(os.path.join(smollm2_path, "model.safetensors"))
    out = llm.generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
    )
    assert "Paris" in out[0].outputs[0].text
