"""K-quant GGUF blocks (Q4_K, Q5_K, Q6_K) repacked for the integer kernels.

A K-quant super-block of 256 weights scales each 32-weight sub-block (Q6_K:
each 16) by the product of a float16 factor and a small integer. Per 32
weights, that is a Q4_1-like block (d q - m, q of 4 or 5 bits) or a Q8-like
one with two scales (d (q - 32), q of 6 bits). The loader decodes the
super-blocks once and lays the values out in groups of eight rows as
cpp/kernels/gguf_packed.h describes, with the products as exact float32
scales, so the kernels that run Q4_1, Q5_0 and Q8_0 run these too.
"""

from __future__ import annotations

import numpy as np

Q4_K, Q5_K, Q6_K = 12, 13, 14
K_TYPES = (Q4_K, Q5_K, Q6_K)
SUPER_BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}
GROUP_BLOCK_BYTES = {Q4_K: 192, Q5_K: 224, Q6_K: 320}  # eight rows' bytes per 32 weights


def _scales_and_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and minimums packed in 12 bytes (Q4_K, Q5_K)."""
    s = scales.astype(np.uint8)
    low = np.concatenate([s[:, 0:4] & 63, s[:, 8:12] & 15 | (s[:, 0:4] >> 6) << 4], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, s[:, 8:12] >> 4 | (s[:, 4:8] >> 6) << 4], axis=1)
    return low.astype(np.float32), mins.astype(np.float32)


def decode(data: np.ndarray, ggml_type: int, n: int, k: int):
    """(q, factors): q uint8 [n, k] quant values and two float32 [n, k / 32]
    factors per 32 weights: (d, m) with weight d q - m (Q4_K, Q5_K), or
    (d of weights 0-15, d of weights 16-31) with weight d (q - 32) (Q6_K)."""
    blocks = data.reshape(-1, SUPER_BLOCK_BYTES[ggml_type])
    count = blocks.shape[0]
    if ggml_type == Q6_K:
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        low = (ql.reshape(count, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
        high = (qh.reshape(count, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        q = low.reshape(count, 2, 4, 32) | high.reshape(count, 2, 4, 32) << 4
        halves = (d * sc).reshape(count, 8, 2)
        return q.reshape(n, k), (halves[..., 0].reshape(n, -1), halves[..., 1].reshape(n, -1))
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _scales_and_mins(blocks[:, 4:16])
    qs = blocks[:, -128:].reshape(count, 4, 1, 32)
    q = (qs >> np.array([0, 4], np.uint8)[:, None]) & 15  # sub-block 2p: low nibbles, 2p + 1: high
    if ggml_type == Q5_K:
        qh = blocks[:, 16:48].reshape(count, 1, 32)
        fifth = (qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        q = q | fifth.reshape(count, 4, 2, 32) << 4
    return q.reshape(n, k), ((d * sc).reshape(n, -1), (dmin * mn).reshape(n, -1))


def pack(data: np.ndarray, ggml_type: int, n: int, k: int) -> np.ndarray:
    """The groups of eight rows [ceil(n / 8), k / 32 * group bytes] that
    gguf_packed_linear takes for a K-quant tensor of n rows of k weights."""
    q, (first, second) = decode(data, ggml_type, n, k)
    groups, blocks = -(-n // 8), k // 32
    pad = groups * 8 - n
    q = np.pad(q, ((0, pad), (0, 0))).reshape(groups, 8, blocks, 32)
    first, second = (
        np.pad(f, ((0, pad), (0, 0))).reshape(groups, 8, blocks) for f in (first, second)
    )
    parts = []
    if ggml_type == Q6_K:  # chunk c: weights 4c .. 4c + 3 of each row
        parts.append(q.reshape(groups, 8, blocks, 8, 4).transpose(0, 2, 3, 1, 4))
    else:  # byte t: weight t (low nibble) and t + 16; chunk c: bytes 4c .. 4c + 3 of each row
        nibbles = (q[..., :16] & 15) | (q[..., 16:] & 15) << 4
        parts.append(nibbles.reshape(groups, 8, blocks, 4, 4).transpose(0, 2, 3, 1, 4))
        if ggml_type == Q5_K:  # bit c of byte 4j + i: fifth bit of weight 4c + i of row j
            bits = (q >> 4).reshape(groups, 8, blocks, 8, 4) << np.arange(8, dtype=np.uint8)[
                :, None
            ]
            parts.append(np.bitwise_or.reduce(bits, axis=3).transpose(0, 2, 1, 3))
    for f in (first, second):
        parts.append(np.ascontiguousarray(f.transpose(0, 2, 1)).view(np.uint8))
    out = np.concatenate([p.reshape(groups, blocks, -1) for p in parts], axis=2)
    return out.reshape(groups, -1)
