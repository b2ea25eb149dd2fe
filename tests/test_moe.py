"""The MoE layer: a decode step reads only the experts its tokens chose, and
its decode (native) and prefill (grouped) paths agree."""

import subprocess
import sys
import textwrap

import pytest
import torch
from tokenmill.layers.moe import FusedMoE, route

# Runs in a child process: the weights of experts no token routes to sit in
# pages with no access, so the kernel faults if it touches one of them.
_GUARDED_STEP = textwrap.dedent(
    """
    import ctypes, mmap
    import numpy as np, torch
    import tokenmill.ops  # noqa: F401

    E, H, I, PAGE = 8, 64, 32, mmap.PAGESIZE
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def guarded(shape, routed):
        per_expert = int(np.prod(shape[1:])) * 4
        assert per_expert % PAGE == 0
        buf = mmap.mmap(-1, per_expert * E + PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        offset = (-base) % PAGE
        array = np.frombuffer(buf, dtype=np.float32, count=E * per_expert // 4, offset=offset)
        t = torch.from_numpy(array).view(*shape)
        t.normal_()
        for e in range(E):
            if e not in routed:
                assert libc.mprotect(base + offset + e * per_expert, per_expert, 0) == 0
        return t, buf

    routed = {2, 5}
    w13, keep1 = guarded((E, 2 * I, H), routed)
    w2, keep2 = guarded((E, H, I), routed)
    x = torch.randn(6, H)
    ids = torch.tensor([[2, 5], [5, 2], [2, 5], [5, 2], [2, 5], [5, 2]], dtype=torch.int32)
    out = torch.empty_like(x)
    torch.ops.tokenmill.fused_moe(out, x, w13, w2, torch.full((6, 2), 0.5), ids, 0)
    assert torch.isfinite(out).all()
    print("read only the routed experts")
    """
)


def test_decode_step_reads_only_the_routed_experts():
    run = subprocess.run([sys.executable, "-c", _GUARDED_STEP], capture_output=True, text=True)
    assert run.returncode == 0, f"the kernel touched an unrouted expert: {run.stderr[-2000:]}"
    assert "read only the routed experts" in run.stdout


def test_guard_catches_a_read_of_an_unrouted_expert():
    """The same guard faults when a token does route to a guarded expert."""
    script = _GUARDED_STEP.replace("[5, 2]], dtype", "[5, 3]], dtype")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "coded"])
def test_native_and_grouped_paths_agree(dtype):
    """Decode-sized steps (the native kernel, over coded bfloat16 copies of
    the weights where packed) against one prefill-sized step (per-expert
    products on the dense path)."""
    coded, dtype = dtype == "coded", torch.bfloat16 if dtype == "coded" else dtype
    torch.manual_seed(0)
    layer = FusedMoE(8, 64, 64).to(dtype)
    layer.w13.data.normal_(0, 0.1)
    layer.w2.data.normal_(0, 0.1)
    if coded:
        from tokenmill.cpu_policy import cpu_has_avx2

        if not cpu_has_avx2():
            pytest.skip("coded weights need AVX2")
        layer.pack()
        assert layer._coded is not None
    x = torch.randn(40, 64, dtype=dtype)
    weights, ids = route(torch.randn(40, 8), 2, renormalize=True)
    native = torch.cat(
        [layer(x[i : i + 8], weights[i : i + 8], ids[i : i + 8]) for i in range(0, 40, 8)]
    )
    grouped = layer(x, weights, ids)  # more tokens than the native path takes
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((native.float() - grouped.float()).norm() / grouped.float().norm()).item() < tol


def test_route_renormalizes_and_orders():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    w, ids = route(logits, 2, renormalize=True)
    assert ids.tolist() == [[1, 2]] and ids.dtype == torch.int32
    assert w.sum().item() == pytest.approx(1.0)
    w2, _ = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)[0]
    assert w2[0].tolist() == pytest.approx([probs[1].item(), probs[2].item()])


def test_tensor_parallel_moe_is_refused(monkeypatch):
    from tokenmill import distributed
    from tokenmill.errors import UnsupportedModelError

    monkeypatch.setattr(distributed, "_group", distributed.TPGroup(rank=0, world=2))
    with pytest.raises(UnsupportedModelError, match="tensor parallelism"):
        FusedMoE(8, 64, 48)


def test_mxfp4_gpt_oss_is_refused(tiny_model, tmp_path):
    import json
    import shutil

    from tokenmill import LLM
    from tokenmill.errors import UnsupportedModelError

    path = tmp_path / "mxfp4"
    shutil.copytree(tiny_model("gpt_oss"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="MXFP4"):
        LLM(str(path))
