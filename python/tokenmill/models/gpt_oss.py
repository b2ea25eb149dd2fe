"""GPT-OSS (bfloat16 weights): Llama-shaped attention with biases, a learned
softmax sink per head and sliding-window layers alternating with full ones;
a router with a bias whose top-k logits are softmaxed; experts with biases
and a clamped SwiGLU."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.errors import UnsupportedModelError
from tokenmill.layers.linear import linear
from tokenmill.layers.moe import FusedMoE, route
from tokenmill.models.decoder import CausalLM, DecoderLayer, DecoderModel
from tokenmill.models.llama import llama_attention


class GptOssMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = FusedMoE(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            "swiglu_oai",
            bias=True,
            swiglu=(getattr(config, "swiglu_alpha", 1.702), config.swiglu_limit),
        )
        self.top_k = config.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.router.weight, self.router.bias)
        weights, ids = route(logits, self.top_k, renormalize=False, softmax_first=False)
        return self.experts(x, weights, ids)


class GptOssForCausalLM(CausalLM):
    renames = {".self_attn.sinks": ".self_attn.attn.sinks"}

    def __init__(self, config, max_positions: int):
        quant = getattr(config, "quantization_config", None) or {}
        if quant.get("quant_method") == "mxfp4":
            raise UnsupportedModelError(
                "GPT-OSS's MXFP4 checkpoints are not supported yet; use its bfloat16 weights"
            )
        super().__init__(config)
        layers = [
            DecoderLayer(
                config,
                llama_attention(config, i, max_positions, qkv_bias=True, o_bias=True, sinks=True),
                GptOssMLP(config),
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.tie_embeddings()
