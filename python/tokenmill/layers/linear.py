"""Linear layers whose weights load from several checkpoint tensors."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input (QKV, gate/up).

    `shards` maps a checkpoint shard id to its (offset, size) in the output
    dimension.
    """

    def __init__(self, in_features: int, out_sizes: dict, bias: bool):
        super().__init__(in_features, sum(out_sizes.values()), bias=bias)
        self.shards = {}
        offset = 0
        for shard, size in out_sizes.items():
            self.shards[shard] = (offset, size)
            offset += size

    def load_shard(self, name: str, shard, tensor: torch.Tensor) -> None:
        offset, size = self.shards[shard]
        target = self.weight if name == "weight" else self.bias
        target.data[offset : offset + size].copy_(tensor)
