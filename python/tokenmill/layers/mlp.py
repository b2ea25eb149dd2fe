"""The gated MLP of decoder models: down(act(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill import distributed
from tokenmill.layers.activation import GatedActivation
from tokenmill.layers.linear import column_parallel, row_parallel
from tokenmill.layers.quantization import QuantConfig, make_linear, make_merged_linear


class GatedMLP(nn.Module):
    def __init__(
        self,
        config,
        intermediate_size: int,
        act: str,
        bias: bool = False,
        reduce: bool = True,
    ):
        super().__init__()
        inter = distributed.split(intermediate_size, "intermediate_size")
        quant = QuantConfig.from_hf(getattr(config, "quantization_config", None))
        self.gate_up_proj = column_parallel(
            make_merged_linear(config.hidden_size, {0: inter, 1: inter}, bias, quant)
        )
        self.gate_up_proj.checkpoint_sizes = [intermediate_size, intermediate_size]
        self.down_proj = row_parallel(make_linear(inter, config.hidden_size, bias, quant))
        self.act = GatedActivation(act)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.act(self.gate_up_proj(x)))
        return distributed.all_reduce(out) if self.reduce else out
