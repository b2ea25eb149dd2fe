"""Round-to-nearest 4-bit quantizers that write the GPTQ and AWQ checkpoint
layouts exactly as published, and their dequantization formulas."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def rtn(w: torch.Tensor, groups_of_k: torch.Tensor, n_groups: int, sym: bool):
    """w [N, K] -> q [N, K] (0..15), scale [G, N], zero [G, N] (integer zero points)."""
    n, k = w.shape
    scale = torch.empty(n_groups, n)
    zero = torch.empty(n_groups, n)
    q = torch.empty(n, k, dtype=torch.int32)
    for g in range(n_groups):
        cols = (groups_of_k == g).nonzero().flatten()
        block = w[:, cols].double()
        if sym:
            s = (2 * block.abs().amax(1) / 15).clamp_min(1e-8)
            z = torch.full_like(s, 8.0)
        else:
            lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            s = ((hi - lo) / 15).clamp_min(1e-8)
            z = torch.round(-lo / s).clamp(1, 15)  # >= 1: GPTQ stores zero - 1
        s = s.half().double()  # checkpoints keep fp16 scales
        q[:, cols] = torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, 15).int()
        scale[g], zero[g] = s.float(), z.float()
    return q, scale, zero


def pack_gptq(w: torch.Tensor, group_size: int, sym: bool, desc_act: bool, seed: int = 0):
    n, k = w.shape
    gs = group_size if group_size != -1 else k
    n_groups = -(-k // gs)
    if desc_act:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // gs).int()
    else:
        g_idx = (torch.arange(k) // gs).int()
    q, scale, zero = rtn(w, g_idx, n_groups, sym)
    qkn = q.t().contiguous()  # [K, N]
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    for i in range(8):
        qweight |= qkn[i::8] << (4 * i)
    zstore = (zero.int() - 1) & 15
    qzeros = torch.zeros(n_groups, n // 8, dtype=torch.int32)
    for i in range(8):
        qzeros |= zstore[:, i::8] << (4 * i)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.half(), "g_idx": g_idx}


def dequant_gptq(t) -> torch.Tensor:
    """[N, K] float64 from GPTQ tensors: w[k, n] = (q - (z + 1)) * s at group g_idx[k]."""
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = torch.stack([(qweight >> (4 * i)) & 15 for i in range(8)], 1).reshape(k, n)
    z = torch.stack([(qzeros >> (4 * i)) & 15 for i in range(8)], 2).reshape(qzeros.shape[0], n) + 1
    g = g_idx.long()
    return ((q - z[g]).double() * scales.double()[g]).t()


def pack_awq(w: torch.Tensor, group_size: int):
    n, k = w.shape
    gs = group_size if group_size != -1 else k
    q, scale, zero = rtn(w, torch.arange(k) // gs, k // gs, sym=False)
    qkn = q.t().contiguous()
    qweight = torch.zeros(k, n // 8, dtype=torch.int32)
    qzeros = torch.zeros(k // gs, n // 8, dtype=torch.int32)
    for i, col in enumerate(AWQ_ORDER):
        qweight |= qkn[:, col::8] << (4 * i)
        qzeros |= zero.int()[:, col::8] << (4 * i)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.half()}


def dequant_awq(t, group_size: int) -> torch.Tensor:
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    k = qweight.shape[0]
    gs = group_size if group_size != -1 else k

    def unpack(p):
        out = torch.empty(p.shape[0], p.shape[1] * 8, dtype=torch.int32)
        for i, col in enumerate(AWQ_ORDER):
            out[:, col::8] = (p >> (4 * i)) & 15
        return out

    q, z = unpack(qweight), unpack(qzeros)
    g = torch.arange(k) // gs
    return ((q - z[g]).double() * scales.double()[g]).t()


QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_checkpoint(
    src: str, dst: str, method: str, group_size: int, sym: bool = True, desc_act: bool = False
):
    """Writes a quantized copy of a float checkpoint; returns the dequantized float state dict."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), dst)
    state = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(src, f)))
    out, dequant = {}, {}
    for i, (name, w) in enumerate(sorted(state.items())):
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in QUANTIZED:
            if method == "gptq":
                t = pack_gptq(w.float(), group_size, sym, desc_act, seed=i)
                dq = dequant_gptq(t)
            else:
                t = pack_awq(w.float(), group_size)
                dq = dequant_awq(t, group_size)
            for piece, tensor in t.items():
                out[f"{module}.{piece}"] = tensor
            dequant[name] = dq.float()
        else:
            out[name] = w
            dequant[name] = w
    save_file(out, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    qc = {"quant_method": method, "bits": 4, "group_size": group_size}
    qc.update(
        {"desc_act": desc_act, "sym": sym}
        if method == "gptq"
        else {"version": "gemm", "zero_point": True}
    )
    cfg["quantization_config"] = qc
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dequant
