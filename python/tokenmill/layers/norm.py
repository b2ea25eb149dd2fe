"""RMSNorm over the tokenmill ops, and Gemma's variant that scales by (1 + w)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual), in place."""
        if residual is None:
            out = torch.empty_like(x)
            torch.ops.tokenmill.rms_norm(out, x, self.weight, self.eps)
            return out
        torch.ops.tokenmill.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual


class GemmaRMSNorm(RMSNorm):
    """Gemma checkpoints store w where the norm scales by (1 + w): the sum is
    taken once, in float32, as the weight loads."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        self.weight.weight_loader = lambda param, w: param.data.copy_(w.float() + 1.0)
