"""OLMo 2: norms after each block instead of before, and q/k norms over the
whole projection."""

from __future__ import annotations

from torch import nn

from tokenmill.layers.norm import RMSNorm
from tokenmill.models.decoder import CausalLM, DecoderModel
from tokenmill.models.llama import llama_attention, llama_mlp


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_positions: int):
        super().__init__()
        self.self_attn = llama_attention(config, layer_idx, max_positions, qk_norm="full")
        self.mlp = llama_mlp(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        x = x + self.post_attention_layernorm(self.self_attn(positions, x, meta))
        return x + self.post_feedforward_layernorm(self.mlp(x)), None


class Olmo2ForCausalLM(CausalLM):
    def __init__(self, config, max_positions: int):
        super().__init__(config)
        layers = [
            Olmo2DecoderLayer(config, i, max_positions) for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.tie_embeddings()
