"""Linear layers over GGUF block weights, kept in the file's bytes.

On CPUs, Q4_0, Q4_1, Q5_0 and Q8_0 weights are repacked at load in groups of
eight rows (the same bytes, moved: `gguf_pack`) and every batch multiplies
them with integer dot products against activations quantized to int8 per 32
values, as llama.cpp computes (`gguf_packed_linear`); a layer merging Q5_0 and
Q8_0 shards takes the Q5_0 ones as Q8_0. Q5_1 keeps the file's layout:
decode-sized batches (up to 16 rows) multiply the blocks directly
(`gguf_linear`), larger ones dequantize tiles of rows into a reused buffer
for the BLAS. Other block types, and merged layers whose shards
differ in type, are dequantized once at load into the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill.cpu_policy import TILE_ROWS
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import linear, shard_offsets

Q5_0, Q8_0 = 6, 8
KERNEL_TYPES = {2, 3, 6, 7, 8}  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
PACKED_TYPES = {2, 3, 6, 8}  # Q4_0, Q4_1, Q5_0, Q8_0
PACKED_GROUP_BYTES = {2: 144, 3: 160, 6: 176, 8: 272}  # eight rows' bytes per 32 columns
DECODE_ROWS = 16


@dataclass
class GGUFBlocks:
    """A quantized GGUF tensor [n, k] as stored: n rows of k / 32 blocks."""

    data: torch.Tensor  # uint8 [n, row bytes]
    ggml_type: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.k)

    def rows(self, start: int, end: int) -> GGUFBlocks:
        return GGUFBlocks(self.data[start:end], self.ggml_type, self.k)

    def split(self, sizes: list[int]) -> list[GGUFBlocks]:
        return [GGUFBlocks(d, self.ggml_type, self.k) for d in self.data.split(sizes)]

    def dequantize(self) -> torch.Tensor:
        return dequantize_gguf(self.data.numpy(), self.ggml_type, self.shape)

    @property
    def packable(self) -> bool:
        """Whether the CPU kernels take this type packed (gguf_packed_linear)."""
        return self.ggml_type in PACKED_TYPES

    def as_q8_0(self) -> GGUFBlocks:
        """Q5_0 blocks as the Q8_0 blocks of the same values, d * (q - 16),
        exactly (34 bytes a block, not 22): for layers merging both types."""
        if self.ggml_type != Q5_0:
            return self
        b = self.data.numpy().reshape(self.shape[0], -1, 22)
        high = (b[..., 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1
        low = np.concatenate([b[..., 6:] & 15, b[..., 6:] >> 4], axis=-1)
        q = ((low | (high << 4).astype(np.uint8)).astype(np.int16) - 16).astype(np.int8)
        blocks = np.concatenate([b[..., :2], q.view(np.uint8)], axis=-1)
        return GGUFBlocks(torch.from_numpy(blocks.reshape(self.shape[0], -1)), Q8_0, self.k)

    def packed(self) -> torch.Tensor:
        """The blocks in groups of eight rows (cpp/kernels/gguf_packed.cpp)."""
        n, k = self.shape
        out = torch.empty(
            -(-n // 8), PACKED_GROUP_BYTES[self.ggml_type] * k // 32, dtype=torch.uint8
        )
        torch.ops.tokenmill.gguf_pack(out, self.data.contiguous(), self.ggml_type, k)
        return out


def dequantize_gguf(data, ggml_type: int, shape, name: str = "a tensor") -> torch.Tensor:
    """float32 values of GGUF blocks (any type the gguf package reads)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        return torch.from_numpy(dequantize(data, ggml_type).reshape(shape))
    except NotImplementedError as e:
        kind = GGMLQuantizationType(ggml_type).name
        raise ModelLoadError(f"GGUF {name} has type {kind}, which tokenmill cannot read") from e


class GGUFLinear(nn.Module):
    """x @ W.T (+ bias) for W given in shards (one for a plain projection,
    several for merged ones) of GGUF blocks or float tensors."""

    def __init__(self, in_features: int, out_sizes: dict, bias: bool):
        super().__init__()
        self.in_features = in_features
        self.shards = shard_offsets(out_sizes)
        self.out_features = sum(out_sizes.values())
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.dtype = torch.get_default_dtype()  # of a dequantized fallback
        self.on_cpu = torch.empty(0).device.type == "cpu"  # built under the model's device
        self.pending: dict = {}
        self.loaded_shards: set = set()
        self.qweight: torch.Tensor | None = None
        self.ggml_type = 0
        self.packed = False
        self.weight: torch.Tensor | None = None

    def load_shard(self, piece: str, shard, tensor) -> None:
        offset, size = self.shards[shard]
        if piece == "bias":
            self.bias.data[offset : offset + size].copy_(tensor)
            return
        if tuple(tensor.shape) != (size, self.in_features):
            raise ValueError(
                f"GGUF tensor of shape {tuple(tensor.shape)} for a [{size}, {self.in_features}] shard"
            )
        self.pending[shard] = tensor
        self.loaded_shards.add(shard)
        if self.loaded_shards == set(self.shards):
            self._finish()

    def _finish(self) -> None:
        parts = [self.pending[s] for s in self.shards]
        types = {p.ggml_type if isinstance(p, GGUFBlocks) else None for p in parts}
        if types == {Q5_0, Q8_0} and self.on_cpu:
            parts, types = [p.as_q8_0() for p in parts], {Q8_0}
        if len(types) == 1 and types <= KERNEL_TYPES:
            whole = GGUFBlocks(torch.cat([p.data for p in parts]), types.pop(), self.in_features)
            self.packed = whole.packable and self.on_cpu
            self.qweight = whole.packed() if self.packed else whole.data.contiguous()
            self.ggml_type = whole.ggml_type
        else:
            floats = [p.dequantize() if isinstance(p, GGUFBlocks) else p for p in parts]
            self.weight = torch.cat(floats).to(self.dtype).contiguous()
        self.pending = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return linear(x, self.weight, self.bias)
        if self.packed:
            out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
            torch.ops.tokenmill.gguf_packed_linear(
                out, x.contiguous(), self.qweight, self.ggml_type
            )
        elif x.shape[0] <= DECODE_ROWS:
            out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
            torch.ops.tokenmill.gguf_linear(out, x.contiguous(), self.qweight, self.ggml_type)
        else:
            out = self._tiled(x)
        return out if self.bias is None else out.add_(self.bias.to(out.dtype))

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles of dequantized rows, each multiplied by the BLAS as it is made."""
        xf = x.float()
        out = torch.empty(x.shape[0], self.out_features)
        tile = torch.empty(min(TILE_ROWS, self.out_features), self.in_features)
        for n0 in range(0, self.out_features, TILE_ROWS):
            n1 = min(self.out_features, n0 + TILE_ROWS)
            rows = tile[: n1 - n0]
            torch.ops.tokenmill.gguf_dequantize(rows, self.qweight, self.ggml_type, n0)
            torch.mm(xf, rows.t(), out=out[:, n0:n1])
        return out.to(x.dtype)
