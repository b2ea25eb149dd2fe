"""Linear layers over GGUF block weights, kept in the file's bytes.

On CPUs, Q4_0, Q4_1, Q5_0 and Q8_0 weights are repacked at load in groups of
eight rows (the same bytes, moved: `gguf_pack`), Q4_K, Q5_K and Q6_K ones
likewise per 32 weights with their scales as float32 (`gguf_kquants`), and
every batch multiplies them with integer dot products against activations
quantized to int8 per 32 values, as llama.cpp computes (`gguf_packed_linear`).
A merged layer whose shards differ in type keeps a run of blocks per type.
Q5_1, and block weights on GPUs, keep the file's layout: decode-sized
batches (up to 16 rows) multiply the blocks directly (`gguf_linear`), larger
ones dequantize tiles of rows into a reused buffer for the BLAS. Other block
types are dequantized once at load into the model's dtype.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill.cpu_policy import TILE_ROWS
from tokenmill.errors import ModelLoadError
from tokenmill.layers import gguf_kquants
from tokenmill.layers.linear import linear, shard_offsets

EXACT_CPU_TYPES = {2, 3, 6, 7, 8}  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: gguf_linear on CPUs
GPU_TYPES = EXACT_CPU_TYPES | set(gguf_kquants.K_TYPES)
PACKED_TYPES = {2, 3, 6, 8, *gguf_kquants.K_TYPES}  # Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K
# eight rows' bytes per 32 columns
PACKED_GROUP_BYTES = {2: 144, 3: 160, 6: 176, 8: 272, **gguf_kquants.GROUP_BLOCK_BYTES}
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

    def packed(self) -> torch.Tensor:
        """The blocks in groups of eight rows (cpp/kernels/gguf_packed.h)."""
        n, k = self.shape
        if self.ggml_type in gguf_kquants.K_TYPES:
            return torch.from_numpy(gguf_kquants.pack(self.data.numpy(), self.ggml_type, n, k))
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


@dataclass
class BlockRun:
    """Output rows [start, start + size) of a layer, held as one block tensor:
    eight-row groups on CPUs (packed), the file's rows elsewhere."""

    start: int
    size: int
    data: torch.Tensor
    ggml_type: int
    packed: bool


class GGUFLinear(nn.Module):
    """x @ W.T (+ bias) for W given in shards (one for a plain projection,
    several for merged ones) of GGUF blocks or float tensors. On CPUs, shards
    of packable types stay blocks, consecutive shards of one type in one run;
    elsewhere one block type for the whole layer does, through the exact
    kernels; anything else is dequantized once into the model's dtype."""

    def __init__(self, in_features: int, out_sizes: dict, bias: bool, activation_bits: int = 8):
        super().__init__()
        self.in_features = in_features
        self.activation_bits = activation_bits  # of the packed integer products
        self.shards = shard_offsets(out_sizes)
        self.out_features = sum(out_sizes.values())
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.dtype = torch.get_default_dtype()  # of a dequantized fallback
        self.on_cpu = torch.empty(0).device.type == "cpu"  # built under the model's device
        self.pending: dict = {}
        self.loaded_shards: set = set()
        self.runs: list[BlockRun] = []
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
        types = [p.ggml_type if isinstance(p, GGUFBlocks) else None for p in parts]
        if all(t in (PACKED_TYPES if self.on_cpu else GPU_TYPES) for t in types):
            start = 0
            for t, run in itertools.groupby(parts, key=lambda p: p.ggml_type):
                whole = _concat(list(run), t, self.in_features)
                data = whole.packed() if self.on_cpu else whole.data.contiguous()
                self.runs.append(BlockRun(start, whole.shape[0], data, t, self.on_cpu))
                start += whole.shape[0]
        elif len(set(types)) == 1 and types[0] in EXACT_CPU_TYPES:  # Q5_1
            whole = _concat(parts, types[0], self.in_features)
            self.runs = [BlockRun(0, self.out_features, whole.data.contiguous(), types[0], False)]
        else:
            floats = [p.dequantize() if isinstance(p, GGUFBlocks) else p for p in parts]
            self.weight = torch.cat(floats).to(self.dtype).contiguous()
        self.pending = {}

    @property
    def block_bytes(self) -> int:
        return sum(r.data.numel() for r in self.runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return linear(x, self.weight, self.bias)
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for run in self.runs:
            part = out if len(self.runs) == 1 else out[:, run.start : run.start + run.size]
            if run.packed:
                torch.ops.tokenmill.gguf_packed_linear(
                    part, x, run.data, run.ggml_type, self.activation_bits
                )
            elif x.shape[0] <= DECODE_ROWS:
                torch.ops.tokenmill.gguf_linear(part, x, run.data, run.ggml_type)
            else:
                self._tiled(x, run, part)
        return out if self.bias is None else out.add_(self.bias.to(out.dtype))

    def _tiled(self, x: torch.Tensor, run: BlockRun, out: torch.Tensor) -> None:
        """Tiles of dequantized rows, each multiplied by the BLAS as it is made
        (float32 on CPUs, the activations' dtype on GPUs)."""
        dtype = torch.float32 if self.on_cpu else x.dtype
        xt = x.to(dtype)
        tile = torch.empty(min(TILE_ROWS, run.size), self.in_features, dtype=dtype, device=x.device)
        for n0 in range(0, run.size, TILE_ROWS):
            n1 = min(run.size, n0 + TILE_ROWS)
            rows = tile[: n1 - n0]
            torch.ops.tokenmill.gguf_dequantize(rows, run.data, run.ggml_type, n0)
            out[:, n0:n1] = xt @ rows.t()


def _concat(parts: list[GGUFBlocks], ggml_type: int, k: int) -> GGUFBlocks:
    if len(parts) == 1:
        return parts[0]
    return GGUFBlocks(torch.cat([p.data for p in parts]), ggml_type, k)
