"""Linear layers: tokenmill's kernel for decode-sized batches on CPUs, and
weights that load from several checkpoint tensors."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill import distributed
from tokenmill.cpu_policy import (
    CODED_M,
    PACK_ROWS_HINT,
    TILE_ROWS,
    available_memory_bytes,
    cpu_has_avx2,
    multiplies_natively,
    small_m,
)
from tokenmill.host_memory import huge_page_copies
from tokenmill.layers.coded import CodedWeight, can_code, code_bf16, coded_linear

# The attributes of a weight that hold its packed and coded forms (they live
# and die with it).
_PACKED = "onednn_packed"
_CODED = "coded_bf16"


def pack_weights(weights: list[torch.Tensor | None]) -> None:
    """Keeps faster forms of CPU weights beside them, while they fit in half
    the free memory. For decode (up to CODED_M rows), a bfloat16 weight's
    coded copy: three quarters of its bytes, exact (layers/coded.py). For
    more rows, a copy in oneDNN's blocked layout, which its matmuls otherwise
    re-pack on every call: 10-15% faster from 256 to 2048 rows. Half-precision
    weights this CPU cannot multiply natively (bfloat16 without avx512_bf16 or
    AMX) are packed as float32, twice their own memory. None entries (a model
    without a separate LM head weight) are skipped."""
    todo = [
        w
        for w in weights
        if w is not None and w.device.type == "cpu" and w.dim() == 2 and w.is_floating_point()
    ]
    budget = available_memory_bytes() // 2 if todo else 0
    budget -= _code([w for w in todo if can_code(w) and not hasattr(w, _CODED)], budget)
    _pack_for_onednn([w for w in todo if not hasattr(w, _PACKED)], budget)


def code_weights(weights: list[torch.Tensor]) -> None:
    """Coded copies of bfloat16 CPU weights (see pack_weights) beside them,
    for layers that call the coded kernels themselves (experts)."""
    todo = [w for w in weights if w.device.type == "cpu" and can_code(w) and not hasattr(w, _CODED)]
    if todo:
        _code(todo, available_memory_bytes() // 2)


def coded_form(weight: torch.Tensor) -> CodedWeight | None:
    return getattr(weight, _CODED, None)


def _code(weights: list[torch.Tensor], budget: int) -> int:
    """Codes bfloat16 weights on CPUs with the coded kernel; returns the bytes taken."""
    # Coding holds a copy of each result until all move to huge pages together.
    if not cpu_has_avx2() or 3 * sum(w.numel() for w in weights) > budget:
        return 0
    coded = [code_bf16(w) for w in weights]
    fields = [f.name for f in dataclasses.fields(CodedWeight)]
    tensors = huge_page_copies([getattr(c, name) for c in coded for name in fields])
    for i, w in enumerate(weights):
        setattr(w, _CODED, CodedWeight(*tensors[i * len(fields) : (i + 1) * len(fields)]))
    return sum(c.nbytes for c in coded)


def _pack_for_onednn(weights: list[torch.Tensor], budget: int) -> None:
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if reorder is None or not torch.backends.mkldnn.is_available():
        return
    native = [w for w in weights if multiplies_natively(w.dtype)]
    widened = [w for w in weights if not multiplies_natively(w.dtype)]
    if widened and 4 * sum(w.numel() for w in widened) > budget:
        widened = []
    for w in native:
        setattr(w, _PACKED, reorder(w, PACK_ROWS_HINT))
    for w in widened:
        setattr(w, _PACKED, reorder(w.float(), PACK_ROWS_HINT))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias with the fastest path for the device and batch size."""
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    coded = getattr(weight, _CODED, None)
    if coded is not None and x.shape[0] <= CODED_M:
        return coded_linear(x, coded, bias)
    packed = getattr(weight, _PACKED, None)
    packed_dtype = None if packed is None else packed.dtype
    if x.shape[0] <= small_m(weight.dtype, packed_dtype) and weight.is_contiguous():
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
        torch.ops.tokenmill.linear(out, x if x.stride(1) == 1 else x.contiguous(), weight, bias)
        return out
    if packed_dtype == weight.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    if packed_dtype == torch.float32:
        # Products of half-precision values are exact in float32: a native GEMM's result.
        b = None if bias is None else bias.float()
        out = torch.ops.mkldnn._linear_pointwise(x.float(), packed, b, "none", [], "")
        return out.to(x.dtype)
    if not multiplies_natively(weight.dtype):
        return _linear_via_float32(x, weight, bias)
    return F.linear(x, weight, bias)


_tile_buffer: dict[int, torch.Tensor] = {}


def _linear_via_float32(x, weight, bias):
    """Without bf16 matrix instructions, float32 BLAS on converted operands is
    several times faster than a half-precision GEMM. The weight is converted
    a tile of rows at a time into a reused buffer, so it is never copied whole."""
    m, k = x.shape
    n = weight.shape[0]
    buf = _tile_buffer.get(k)
    if buf is None:
        buf = _tile_buffer[k] = torch.empty(TILE_ROWS, k)
    xf = x.float()
    # Column blocks of a row-major result: no transposed copy at the end.
    out = torch.empty(m, n)
    for n0 in range(0, n, TILE_ROWS):
        n1 = min(n, n0 + TILE_ROWS)
        tile = buf[: n1 - n0]
        tile.copy_(weight[n0:n1])
        torch.mm(xf, tile.t(), out=out[:, n0:n1])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One matmul for several projections of the same input (QKV, gate/up).

    `shards` maps a checkpoint shard id to its (offset, size) in the output
    dimension.
    """

    def __init__(self, in_features: int, out_sizes: dict, bias: bool):
        super().__init__(in_features, sum(out_sizes.values()), bias=bias)
        self.shards = shard_offsets(out_sizes)

    def load_shard(self, name: str, shard, tensor: torch.Tensor) -> bool:
        """Copies one checkpoint tensor (weight or bias) of a shard into its rows."""
        offset, size = self.shards[shard]
        target = self.weight if name == "weight" else self.bias
        target.data[offset : offset + size].copy_(tensor)
        return True


def shard_offsets(out_sizes: dict) -> dict:
    """shard id -> (offset, size) of consecutive shards in the output dimension."""
    offsets, offset = {}, 0
    for shard, size in out_sizes.items():
        offsets[shard] = (offset, size)
        offset += size
    return offsets


def column_parallel(module: nn.Module) -> nn.Module:
    """Marks a linear whose output rows are split across tensor-parallel ranks."""
    module.tp_shard = _column_shard
    return module


def row_parallel(module: nn.Module) -> nn.Module:
    """Marks a linear whose inputs are split across ranks; the partial outputs are summed."""
    module.tp_shard = _row_shard
    return module


def _column_shard(piece: str, shard, tensor: torch.Tensor) -> torch.Tensor:
    group = distributed.tp()
    n = tensor.shape[0] // group.world
    return tensor[group.rank * n : (group.rank + 1) * n]


def _row_shard(piece: str, shard, tensor: torch.Tensor) -> torch.Tensor:
    group = distributed.tp()
    if piece == "bias":  # added once, by rank 0, before the sum
        return tensor if group.rank == 0 else torch.zeros_like(tensor)
    n = tensor.shape[1] // group.world
    return tensor[:, group.rank * n : (group.rank + 1) * n]
