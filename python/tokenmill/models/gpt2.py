"""GPT-2: learned positions, LayerNorm, an ungated GELU MLP and Conv1D
checkpoint weights (stored input-major)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill.layers.attention import AttentionMetadata, PagedAttention
from tokenmill.layers.linear import Linear, linear


class GPT2Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, heads = config.n_embd, config.n_head
        self.head_dim = d // heads
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.c_attn = Linear(d, 3 * d)
        self.attn_proj = Linear(d, d)
        inner = config.n_inner or 4 * d
        self.c_fc = Linear(d, inner)
        self.mlp_proj = Linear(inner, d)
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.attn = PagedAttention(heads, heads, self.head_dim, scale)
        self.approximate = (
            "tanh" if config.activation_function in ("gelu_new", "gelu_pytorch_tanh") else "none"
        )

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn_proj(self.attn(q, k, v, meta))
        h = F.gelu(self.c_fc(self.ln_2(x)), approximate=self.approximate)
        return x + self.mlp_proj(h)


class GPT2LMHeadModel(nn.Module):
    # checkpoint name -> parameter name, for names that differ
    renames = {
        ".attn.c_attn.": ".c_attn.",
        ".attn.c_proj.": ".attn_proj.",
        ".mlp.c_fc.": ".c_fc.",
        ".mlp.c_proj.": ".mlp_proj.",
    }
    conv1d = (".c_attn.weight", ".attn_proj.weight", ".c_fc.weight", ".mlp_proj.weight")

    def __init__(self, config, max_positions: int):
        super().__init__()
        from tokenmill import distributed

        if distributed.tp().world > 1:
            raise ValueError("GPT-2 does not support tensor parallelism yet")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn for block in self.h]

    def forward(self, input_ids, positions, meta):
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.wte.weight).float()

    @property
    def logits_weight(self) -> torch.Tensor:
        """compute_logits(h) is linear(h, logits_weight).float()."""
        return self.wte.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers; the head is tied to wte
            name = name.removeprefix("transformer.")
            for old, new in self.renames.items():
                name = name.replace(old, new)
            if name not in params:
                raise KeyError(f"unexpected checkpoint tensor {name}")
            if name.endswith(self.conv1d):
                tensor = tensor.t()
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded
