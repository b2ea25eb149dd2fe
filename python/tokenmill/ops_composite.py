"""The tokenmill ops written with plain torch operators.

They have the signatures and in-place semantics of ``torch.ops.tokenmill.*``
and run on any torch device (Intel ``xpu`` included), at the cost of
gathering the paged cache into dense tensors.
"""

import torch
import torch.nn.functional as F


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = key_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    num_kv_heads, head_size = key_cache.shape[1], key_cache.shape[3]
    k = key.reshape(-1, num_kv_heads, head_size)[valid]
    v = value.reshape(-1, num_kv_heads, head_size)[valid]
    key_cache[blocks, :, offsets] = k
    value_cache[blocks, :, offsets] = v


def paged_attention(
    out,
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    sliding_window=0,
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    num_decode_seqs=0,  # a hint for the native kernels' order of work
):
    num_kv_heads, block_size, head_size = key_cache.shape[1:]
    q_all = query.reshape(query.shape[0], -1, head_size)
    out_all = out.view(out.shape[0], -1, head_size)
    group = q_all.shape[1] // num_kv_heads
    for i in range(seq_lens.numel()):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        ctx = int(seq_lens[i])
        nblocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[i, :nblocks].long()
        k = key_cache[blocks].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_size)[:, :ctx]
        v = value_cache[blocks].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_size)[:, :ctx]
        k = k.repeat_interleave(group, 0).float()
        v = v.repeat_interleave(group, 0).float()
        q = q_all[start:end].transpose(0, 1).float()
        scores = q @ k.transpose(1, 2) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        qpos = torch.arange(ctx - (end - start), ctx, device=query.device)[:, None]
        kpos = torch.arange(ctx, device=query.device)[None, :]
        if alibi_slopes is not None:
            scores = scores + alibi_slopes[:, None, None] * (kpos - qpos)
        mask = kpos > qpos
        if sliding_window > 0:
            mask |= qpos - kpos >= sliding_window
        scores = scores.masked_fill(mask, float("-inf"))
        if sinks is not None:  # a column that joins the softmax and carries no value
            sink = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(scores, -1)
        out_all[start:end] = (probs @ v).transpose(0, 1).to(out.dtype)


def rms_norm(out, x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    out.copy_(y.to(out.dtype))


def fused_add_rms_norm(x, residual, weight, eps):
    residual.add_(x)
    rms_norm(x, residual, weight, eps)


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    for t in (query, key):
        if t is None:
            continue
        x = t.view(t.shape[0], -1, head_size)
        r = x[..., :rot].float()
        c, s = cos[:, None, :], sin[:, None, :]
        if is_neox:
            x1, x2 = r.chunk(2, dim=-1)
            rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
            rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        x[..., :rot] = rotated.to(t.dtype)


def silu_and_mul(out, x):
    d = out.shape[-1]
    out.copy_((F.silu(x[..., :d].float()) * x[..., d:].float()).to(out.dtype))


def gelu_and_mul(out, x, approximate_tanh=False):
    d = out.shape[-1]
    act = F.gelu(x[..., :d].float(), approximate="tanh" if approximate_tanh else "none")
    out.copy_((act * x[..., d:].float()).to(out.dtype))


def linear(out, x, weight, bias=None):
    out.copy_(F.linear(x, weight.to(x.dtype), bias))


def _unpack_int4(qweight):
    """tokenmill int4 layout -> uint8 values [N, K_padded]."""
    n, half = qweight.shape
    runs = qweight.view(n, half // 16, 16)
    return torch.cat((runs & 15, runs >> 4), dim=-1).view(n, half * 2)


def int4_dequantize(out, qweight, scales, zeros, group_size, row_start):
    rows = slice(row_start, row_start + out.shape[0])
    q = _unpack_int4(qweight[rows]).float()
    s = scales[rows].repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    z = zeros[rows].repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    out.copy_(q * s - z)


def int4_linear(out, x, qweight, scales, zeros, group_size):
    w = torch.empty(qweight.shape[0], qweight.shape[1] * 2, device=x.device)
    int4_dequantize(w, qweight, scales, zeros, group_size, 0)
    out.copy_(x.float() @ w[:, : x.shape[1]].t())


def _swiglu_oai(gate, up, alpha, limit):
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def fused_moe(
    out,
    x,
    w13,
    w2,
    topk_weights,
    topk_ids,
    activation,
    w13_bias=None,
    w2_bias=None,
    swiglu_alpha=0.0,
    swiglu_limit=0.0,
):
    inter = w13.shape[1] // 2
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate_up = x[token].float() @ w13[e].float().t()
        if w13_bias is not None:
            gate_up += w13_bias[e]
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if activation == 2:
            h = _swiglu_oai(gate, up, swiglu_alpha, swiglu_limit)
        else:
            h = (F.silu(gate) if activation == 0 else F.gelu(gate, approximate="tanh")) * up
        y = h @ w2[e].float().t()
        if w2_bias is not None:
            y += w2_bias[e]
        total.index_add_(0, token, y * topk_weights[token, slot, None])
    out.copy_(total.to(out.dtype))


# GGUF block formats (ggml type -> (bytes per 32 weights, has a minimum, high bits))
GGUF_BLOCKS = {
    2: (18, False, False),
    3: (20, True, False),
    6: (22, False, True),
    7: (24, True, True),
}
GGUF_BLOCKS[8] = (34, False, False)


def _gguf_rows(qweight, ggml_type):
    """float32 [n, k] of GGUF block rows qweight uint8 [n, k / 32 * bytes]."""
    size, has_min, high_bits = GGUF_BLOCKS[ggml_type]
    b = qweight.view(qweight.shape[0], -1, size)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if ggml_type == 8:
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).flatten(1)
    m = b[..., 2:4].contiguous().view(torch.float16).float() if has_min else None
    start = 4 if has_min else 2
    if high_bits:
        h = b[..., start : start + 4].contiguous().view(torch.int32)
        start += 4
    nib = b[..., start : start + 16].int()
    q = torch.cat([nib & 15, nib >> 4], dim=-1)
    if high_bits:
        shifts = torch.arange(32, device=qweight.device, dtype=torch.int32)
        q = q | (((h >> shifts) & 1) << 4)
    offset = m if has_min else -(16.0 if high_bits else 8.0) * d
    return (q.float() * d + offset).flatten(1)


def gguf_dequantize(out, qweight, ggml_type, row_start):
    out.copy_(_gguf_rows(qweight[row_start : row_start + out.shape[0]], ggml_type))


def gguf_linear(out, x, qweight, ggml_type):
    out.copy_((x.float() @ _gguf_rows(qweight, ggml_type).t()).to(out.dtype))


def apply_token_bitmask(logits, bitmask, rows):
    """-inf where a row's bitmask (bit t % 32 of word t / 32) clears token t."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    bits = ((bitmask[rows][:, :, None] >> shifts) & 1).reshape(len(rows), -1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(bits == 0, float("-inf"))
