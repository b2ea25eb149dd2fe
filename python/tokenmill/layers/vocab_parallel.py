"""Embedding and LM head split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import distributed

LOGITS_ACTIVATION_BITS = 14


class VocabParallelEmbedding(nn.Module):
    """Each rank holds ceil(V / world) rows; lookups of other ranks' rows give
    zeros here and are summed across ranks."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        group = distributed.tp()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.per_rank = -(-num_embeddings // group.world)
        self.start = group.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        self.dtype = self.weight.dtype

    def load_blocks(self, blocks) -> None:
        """Loads a GGUF table (GGUFBlocks). Types with packed kernels stay
        blocks on one CPU rank: lookups dequantize the rows they read, and
        logits (a tied or separate head) take GGUFLinear's integer products.
        The weight's `ggml_type` says which; a tied head shares it."""
        if distributed.tp().world == 1 and self.weight.device.type == "cpu" and blocks.packable:
            self.weight.requires_grad_(False)
            self.weight.data = blocks.packed()
            self.weight.ggml_type = blocks.ggml_type
        else:
            self.weight.data.copy_(self.shard(blocks.dequantize()))

    @property
    def ggml_type(self) -> int | None:
        return getattr(self.weight, "ggml_type", None)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full [V, dim] checkpoint tensor, zero-padded."""
        rows = full[self.start : self.start + self.per_rank]
        if rows.shape[0] < self.per_rank:
            rows = torch.cat([rows, rows.new_zeros(self.per_rank - rows.shape[0], rows.shape[1])])
        return rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ggml_type is not None:
            out = torch.empty(ids.numel(), self.dim, dtype=self.dtype)
            ids = ids.reshape(-1).long()
            torch.ops.tokenmill.gguf_packed_rows(
                out, ids, self.weight, self.ggml_type, self.num_embeddings
            )
            return out
        if distributed.tp().world == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[:, None], 0)
        return distributed.all_reduce(x)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """hidden @ weight.T over the whole vocabulary (weight: this rank's rows)."""
        from tokenmill.layers.linear import linear

        if self.ggml_type is not None and weight is None:
            # 14-bit activations: 8-bit ones would move the logits as much as the weights' rounding
            out = torch.empty(hidden.shape[0], self.num_embeddings)
            torch.ops.tokenmill.gguf_packed_linear(
                out, hidden.contiguous(), self.weight, self.ggml_type, LOGITS_ACTIVATION_BITS
            )
            return out
        local = linear(hidden, self.weight if weight is None else weight).float()
        return distributed.gather_last_dim(local)[:, : self.num_embeddings]
