"""GPTQ and AWQ 4-bit checkpoints, converted at load into tokenmill's int4
layout (cpp/kernels/int4.cpp) and run by the int4 kernels.

Checkpoint layouts, for a linear layer y = x W with W of K inputs x N outputs:

GPTQ (AutoGPTQ / GPTQModel "gptq" format):
  qweight int32 [K/8, N]: eight 4-bit values packed along the input dimension;
      the value of input k sits in word k // 8 at bits 4 * (k % 8).
  qzeros int32 [groups, N/8]: zero points packed along the output dimension,
      column n in word n // 8 at bits 4 * (n % 8). The classic format stores
      zero - 1, so the zero point is the stored value plus one.
  scales fp16 [groups, N]; g_idx int32 [K]: the group of each input (k //
      group_size unless desc_act reordered the inputs).
  w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].

AWQ (AutoAWQ GEMM format):
  qweight int32 [K, N/8] and qzeros int32 [K/group_size, N/8]: packed along
      the output dimension in an interleaved order: nibble i of a word holds
      column 8 * (n // 8) + AWQ_ORDER[i]. The zero point is stored as is.
  scales fp16 [K/group_size, N].
  w[k, n] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n].

desc_act checkpoints are stored with their inputs sorted by group, and the
layer permutes x the same way before the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill.cpu_policy import INT4_SMALL_M, TILE_ROWS
from tokenmill.errors import UnsupportedModelError
from tokenmill.layers.gguf_linear import GGUFLinear
from tokenmill.layers.linear import Linear, MergedLinear, shard_offsets

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group over all inputs
    desc_act: bool = False
    sym: bool = True
    activation_bits: int = 8  # GGUF: of the integer products

    @classmethod
    def from_hf(cls, qc: dict | None) -> QuantConfig | None:
        if not qc:
            return None
        method = str(qc.get("quant_method", "")).lower()
        if method == "gguf":  # GGUF files: block types per tensor, known as they load
            return cls("gguf", 0, 0, activation_bits=int(qc.get("activation_bits", 8)))
        supported = (
            "GPTQ and AWQ (GEMM) checkpoints with bits=4 and group_size -1 or a multiple of 32"
        )
        if method not in ("gptq", "awq"):
            raise UnsupportedModelError(
                f"quantization method {method!r} is not supported; tokenmill runs {supported}"
            )
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4 or (group != -1 and group % 32) or (method == "awq" and version != "gemm"):
            raise UnsupportedModelError(
                f"unsupported {method} config (bits={bits}, group_size={group}, version={version}); tokenmill runs {supported}"
            )
        if qc.get("checkpoint_format", "gptq") not in ("gptq", None):
            raise UnsupportedModelError(
                f"GPTQ checkpoint_format {qc['checkpoint_format']!r} is not supported; tokenmill runs {supported}"
            )
        return cls(method, bits, group, bool(qc.get("desc_act", False)), bool(qc.get("sym", True)))


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int [R * 8, C], eight nibbles per word along the rows."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, order=None) -> torch.Tensor:
    """int32 [R, C] -> int [R, C * 8], eight nibbles per word along the columns."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    vals = (packed[:, :, None] >> shifts[None, None, :]) & 15
    if order is not None:  # nibble i holds column order[i]
        vals = vals[:, :, torch.tensor([order.index(c) for c in range(8)])]
    return vals.reshape(packed.shape[0], -1)


def pack_tokenmill(q: torch.Tensor) -> torch.Tensor:
    """uint8 values [N, K] (K a multiple of 32) -> tokenmill int4 layout uint8 [N, K/2]."""
    n, k = q.shape
    runs = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)


@dataclass
class Int4Weight:
    """One projection in tokenmill's layout, rows = outputs."""

    qweight: torch.Tensor  # uint8 [N, K_padded / 2]
    scales: torch.Tensor  # float32 [N, groups]
    zeros: torch.Tensor  # float32 [N, groups], zero point x scale
    perm: torch.Tensor | None  # input order (desc_act), or None


def _to_tokenmill(
    q_kn: torch.Tensor,
    zeros_gn: torch.Tensor,
    scales_gn: torch.Tensor,
    group_of_k: torch.Tensor,
    group_size: int,
) -> Int4Weight:
    k, n = q_kn.shape
    perm = None
    if not torch.equal(group_of_k, torch.arange(k) // group_size):
        perm = torch.argsort(group_of_k, stable=True)
        if not torch.equal(group_of_k[perm], torch.arange(k) // group_size):  # noqa: SIM102
            raise UnsupportedModelError("g_idx does not form equal-sized groups")
        q_kn = q_kn[perm]
    k_padded = -(-k // 32) * 32
    q = torch.zeros(n, k_padded, dtype=torch.uint8)
    q[:, :k] = q_kn.t().to(torch.uint8)
    groups = -(-k_padded // group_size)
    scales = torch.zeros(n, groups)
    zeros = torch.zeros(n, groups)
    g = scales_gn.shape[0]
    scales[:, :g] = scales_gn.t().float()
    zeros[:, :g] = zeros_gn.t().float() * scales_gn.t().float()
    return Int4Weight(pack_tokenmill(q), scales.contiguous(), zeros.contiguous(), perm)


def convert_gptq(qweight, qzeros, scales, g_idx, group_size: int) -> Int4Weight:
    q = _unpack_rows(qweight)  # [K, N]
    k = q.shape[0]
    gs = group_size if group_size != -1 else k
    z = _unpack_cols(qzeros) + 1  # stored as zero - 1
    group_of_k = g_idx.long() if g_idx is not None else torch.arange(k) // gs
    return _to_tokenmill(q, z[:, : q.shape[1]], scales, group_of_k, gs)


def convert_awq(qweight, qzeros, scales, group_size: int) -> Int4Weight:
    q = _unpack_cols(qweight, AWQ_ORDER)  # [K, N]
    k = q.shape[0]
    gs = group_size if group_size != -1 else k
    z = _unpack_cols(qzeros, AWQ_ORDER)
    return _to_tokenmill(q, z, scales, torch.arange(k) // gs, gs)


class Int4Linear(nn.Module):
    """A linear layer whose weight stays 4-bit; shards (merged QKV or
    gate/up) fill consecutive output rows."""

    def __init__(self, in_features: int, out_sizes: dict, bias: bool, quant: QuantConfig):
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(out_sizes.values())
        self.quant = quant
        self.group_size = quant.group_size if quant.group_size != -1 else -(-in_features // 32) * 32
        self.k_padded = -(-in_features // 32) * 32
        groups = -(-self.k_padded // self.group_size)  # the last group may be partial
        self.register_buffer(
            "qweight", torch.zeros(self.out_features, self.k_padded // 2, dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.zeros(self.out_features, groups, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(self.out_features, groups, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.shards = shard_offsets(out_sizes)
        self.perms: dict = {}  # shard -> input permutation (desc_act)
        self._pending: dict = {}
        self.loaded_shards: set = set()

    def load_shard(self, name: str, shard, tensor: torch.Tensor) -> bool:
        """Buffers checkpoint tensors of one shard; converts once all are there. True when done."""
        if name == "bias":
            offset, size = self.shards[shard]
            self.bias.data[offset : offset + size].copy_(tensor)
            return False
        if shard in self.loaded_shards:
            return False  # e.g. a trivial g_idx arriving after the conversion
        parts = self._pending.setdefault(shard, {})
        parts[name] = tensor
        need = {"qweight", "qzeros", "scales"} | (
            {"g_idx"} if self.quant.method == "gptq" and self.quant.desc_act else set()
        )
        if not need <= parts.keys():
            return False
        if self.quant.method == "gptq":
            w = convert_gptq(
                parts["qweight"],
                parts["qzeros"],
                parts["scales"],
                parts.get("g_idx"),
                self.quant.group_size,
            )
        else:
            w = convert_awq(
                parts["qweight"], parts["qzeros"], parts["scales"], self.quant.group_size
            )
        offset, size = self.shards[shard]
        if w.qweight.shape != (size, self.k_padded // 2):
            raise UnsupportedModelError(
                f"quantized shard {shard} has shape {tuple(w.qweight.shape)}, expected {(size, self.k_padded // 2)}"
            )
        self.qweight[offset : offset + size] = w.qweight
        self.scales[offset : offset + size] = w.scales
        self.zeros[offset : offset + size] = w.zeros
        if w.perm is not None:
            self.perms[shard] = w.perm
        del self._pending[shard]
        self.loaded_shards.add(shard)
        return True

    def _padded(self, x: torch.Tensor, perm) -> torch.Tensor:
        x = x.float()
        if perm is not None:
            x = x[:, perm]
        if self.k_padded != x.shape[1]:
            x = F.pad(x, (0, self.k_padded - x.shape[1]))
        return x.contiguous()

    def _rows(self, rows: slice):
        if rows == slice(None):  # no views to build on the decode path
            return self.qweight, self.scales, self.zeros
        return self.qweight[rows], self.scales[rows], self.zeros[rows]

    def _matmul(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        q, s, z = self._rows(rows)
        if x.shape[0] <= INT4_SMALL_M:
            out = torch.empty(x.shape[0], q.shape[0], device=x.device, dtype=torch.float32)
            torch.ops.tokenmill.int4_linear(out, x, q, s, z, self.group_size)
            return out
        # Prefill: dequantize tiles of rows into a reused buffer for the BLAS.
        out_t = torch.empty(q.shape[0], x.shape[0], device=x.device, dtype=torch.float32)
        tile = torch.empty(
            min(TILE_ROWS, q.shape[0]), self.k_padded, device=x.device, dtype=torch.float32
        )
        xt = x.t()
        for r0 in range(0, q.shape[0], TILE_ROWS):
            r1 = min(q.shape[0], r0 + TILE_ROWS)
            torch.ops.tokenmill.int4_dequantize(tile[: r1 - r0], q, s, z, self.group_size, r0)
            torch.mm(tile[: r1 - r0], xt, out=out_t[r0:r1])
        return out_t.t()

    def _native(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x [M, K] through int4_linear in its own dtype, K unpadded."""
        q, s, z = self._rows(rows)
        y = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
        torch.ops.tokenmill.int4_linear(y, x.contiguous(), q, s, z, self.group_size)
        return y

    def _takes_native(self, x: torch.Tensor) -> bool:
        if x.device.type == "cpu":
            # Decode: one native op (one program with its neighbours in a graph).
            return x.shape[0] <= INT4_SMALL_M and not self.perms
        # CUDA runs 16-bit batches of any size on tensor cores; ROCm has no
        # tensor-core GEMM here, so its prefill takes the dequantized tiles.
        return x.dtype != torch.float32 and (x.shape[0] <= INT4_SMALL_M or not torch.version.hip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_native(x):
            if not self.perms:
                y = self._native(x, slice(None))
            else:
                y = torch.cat(
                    [
                        self._native(
                            x[:, self.perms[shard]] if shard in self.perms else x,
                            slice(offset, offset + size),
                        )
                        for shard, (offset, size) in self.shards.items()
                    ],
                    dim=1,
                )
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if not self.perms:
            y = self._matmul(self._padded(x, None), slice(None))
        else:
            parts = []
            for shard, (offset, size) in self.shards.items():
                parts.append(
                    self._matmul(
                        self._padded(x, self.perms.get(shard)), slice(offset, offset + size)
                    )
                )
            y = torch.cat(parts, dim=1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).contiguous()


def make_linear(in_features: int, out_features: int, bias: bool, quant=None) -> nn.Module:
    """A plain or a 4-bit linear layer, as the checkpoint's quantization config says."""
    if quant is None:
        return Linear(in_features, out_features, bias=bias)
    if quant.method == "gguf":
        return GGUFLinear(in_features, {None: out_features}, bias, quant.activation_bits)
    return Int4Linear(in_features, {None: out_features}, bias, quant)


def make_merged_linear(in_features: int, out_sizes: dict, bias: bool, quant=None) -> nn.Module:
    if quant is None:
        return MergedLinear(in_features, out_sizes, bias=bias)
    if quant.method == "gguf":
        return GGUFLinear(in_features, out_sizes, bias, quant.activation_bits)
    return Int4Linear(in_features, out_sizes, bias, quant)
