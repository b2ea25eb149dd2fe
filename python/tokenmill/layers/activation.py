"""Gated activations: act(x[:, :d]) * x[:, d:] for a merged gate/up projection."""

from __future__ import annotations

import torch
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)

_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh", "gelu_fast")


class GatedActivation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        if name == "silu":
            self.op, self.args = torch.ops.tokenmill.silu_and_mul, ()
        elif name in _TANH_GELUS or name == "gelu":
            self.op, self.args = torch.ops.tokenmill.gelu_and_mul, (name != "gelu",)
        else:
            raise ValueError(f"unsupported hidden_act {name!r}")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = torch.empty(
            gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device
        )
        self.op(out, gate_up, *self.args)
        return out


def hidden_act(config) -> str:
    """The MLP activation a config names (Gemma's `hidden_activation` first)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
