"""Greedy tokens without the full logits, for CPU decode steps of one sequence.

The LM head is a large share of a small model's weights (SmolLM2-135M: 56.6
of 269 MB read per token in bfloat16), and a greedy step needs only its
argmax. The native op scores every vocabulary row from an int8 copy of the
head, bounds each score's error, and scores exactly (as the full logits would
be) only the rows that could win, so the token is the same one.
"""

from __future__ import annotations

import torch

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)

_CHUNK_ROWS = 4096


def _rounding_room(k: int) -> float:
    """Room in each bound, per |w| |x|, for the float rounding of both dot
    products: each is off by at most k 2^-24 |w| |x|; twice their sum, and no
    less than 1e-3."""
    return max(1e-3, 4 * k * 2.0**-24)


class GreedyHead:
    """The int8 copy of an LM head weight [vocab, hidden] with its row scales and
    error bounds, and the greedy token of one hidden state."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        v, k = weight.shape
        self.q = torch.empty(v, k, dtype=torch.int8)
        self.scales = torch.empty(v)
        self.bounds = torch.empty(v)
        for r0 in range(0, v, _CHUNK_ROWS):
            rows = weight[r0 : r0 + _CHUNK_ROWS].double()
            scale = rows.abs().amax(1) / 127
            scale[scale == 0] = 1
            q = torch.round(rows / scale[:, None]).clamp(-127, 127)
            scale = scale.float().double()  # what the kernel multiplies by
            error = (rows - q * scale[:, None]).norm(dim=1)
            bound = error + _rounding_room(k) * rows.norm(dim=1)
            self.q[r0 : r0 + len(rows)] = q.to(torch.int8)
            self.scales[r0 : r0 + len(rows)] = scale.float()
            self.bounds[r0 : r0 + len(rows)] = (bound * (1 + 1e-6)).float()
        self._token = torch.empty(1, dtype=torch.long)

    def __call__(self, hidden: torch.Tensor) -> int | None:
        """The greedy token of hidden [1, hidden_size], or None where the full
        logits must decide (no fast path on this CPU, or a non-finite state)."""
        torch.ops.tokenmill.greedy_head(
            self._token, hidden.contiguous(), self.weight, self.q, self.scales, self.bounds
        )
        token = int(self._token[0])
        return None if token < 0 else token
