"""bfloat16 weights in 12 bits a value, exactly, for decode on CPUs.

A decode step reads every weight once and waits on memory. Each value keeps
its low byte (lowest exponent bit and mantissa); its high byte (sign and the
other exponent bits) becomes a 4-bit code into a per-matrix table of 16.
Trained weights use few exponents, so the table holds nearly every high
byte; the rest (about 0.02% of SmolLM2's values) are listed exactly beside
it. The kernel and the layout are in cpp/kernels (kernels.h: CodedBf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)

BLOCK = 64  # the kernel reads 64 values of a row at a time


@dataclass
class CodedWeight:
    low: torch.Tensor  # uint8 [n, k]
    codes: torch.Tensor  # uint8 [n, k / 2]
    table: torch.Tensor  # uint8 [16], table[0] == 0
    escape_offsets: torch.Tensor  # int32 [n + 1]
    escape_cols: torch.Tensor  # int32 [escapes]
    escape_values: torch.Tensor  # float32 [escapes]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def can_code(weight: torch.Tensor) -> bool:
    return (
        weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.shape[1] % BLOCK == 0
        and weight.shape[0] > 0
    )


def code_bf16(weight: torch.Tensor) -> CodedWeight:
    """The coded form of a bfloat16 weight [n, k] (k a multiple of 64)."""
    if not can_code(weight):
        raise ValueError(f"cannot code a {weight.dtype} weight of shape {tuple(weight.shape)}")
    n, k = weight.shape
    weight = weight.contiguous()
    high = (weight.view(torch.int16) >> 8).to(torch.uint8)
    counts = torch.bincount(high.flatten(), minlength=256)
    counts[0] = -1  # 0 is always entry 0: escapes read as +0
    table = torch.cat([torch.zeros(1, dtype=torch.int64), counts.topk(15).indices])
    coded = CodedWeight(
        low=torch.empty(n, k, dtype=torch.uint8),
        codes=torch.empty(n, k // 2, dtype=torch.uint8),
        table=table.to(torch.uint8),
        escape_offsets=torch.empty(n + 1, dtype=torch.int32),
        escape_cols=torch.empty(0, dtype=torch.int32),
        escape_values=torch.empty(0),
    )
    args = (weight, coded.table, coded.low, coded.codes, coded.escape_offsets)
    torch.ops.tokenmill.code_bf16(*args)
    escapes = int(coded.escape_offsets[-1])
    if escapes:
        coded.escape_cols = torch.empty(escapes, dtype=torch.int32)
        coded.escape_values = torch.empty(escapes)
        torch.ops.tokenmill.code_bf16(*args, coded.escape_cols, coded.escape_values)
    return coded


def coded_linear(
    x: torch.Tensor, weight: CodedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W.T + bias for the bfloat16 weight W that `weight` codes."""
    out = torch.empty(x.shape[0], weight.low.shape[0], dtype=x.dtype)
    torch.ops.tokenmill.coded_linear(
        out,
        x if x.stride(1) == 1 else x.contiguous(),
        weight.low,
        weight.codes,
        weight.table,
        weight.escape_offsets,
        weight.escape_cols,
        weight.escape_values,
        bias,
    )
    return out
