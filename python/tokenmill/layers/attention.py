"""Paged attention layer: writes the step's K/V into the cache, then attends."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    """Step inputs that every attention layer shares."""

    slot_mapping: torch.Tensor  # int32 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int = 0,
        softcap: float = 0.0,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale, self.sliding_window, self.softcap = scale, sliding_window or 0, softcap or 0.0
        self.key_cache: torch.Tensor | None = None  # set by the model runner
        self.value_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        torch.ops.tokenmill.reshape_and_cache(
            k, v, self.key_cache, self.value_cache, meta.slot_mapping
        )
        out = torch.empty(
            q.shape[0], self.num_heads * self.head_size, dtype=q.dtype, device=q.device
        )
        torch.ops.tokenmill.paged_attention(
            out,
            q,
            self.key_cache,
            self.value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            self.sliding_window,
            self.softcap,
            None,
        )
        return out
