"""Llama and its close relatives: Mistral (sliding window), Qwen2 (QKV bias),
Qwen3 (per-head q/k norm), Phi-3 (fused projections, LongRoPE) and Granite
(multipliers)."""

from __future__ import annotations

from tokenmill.layers.activation import hidden_act
from tokenmill.layers.attention import Attention, AttentionOptions
from tokenmill.layers.mlp import GatedMLP
from tokenmill.layers.norm import RMSNorm
from tokenmill.models.decoder import CausalLM, DecoderLayer, DecoderModel


def llama_attention(config, layer_idx: int, max_positions: int, **overrides) -> Attention:
    opts = AttentionOptions(
        qkv_bias=getattr(config, "attention_bias", False)
        or getattr(config, "qkv_bias", False)
        or config.model_type == "qwen2",
        o_bias=getattr(config, "attention_bias", False),
        qk_norm="head" if config.model_type in ("qwen3", "qwen3_moe") else None,
        norm=RMSNorm,
    )
    for key, value in overrides.items():
        setattr(opts, key, value)
    return Attention(config, layer_idx, max_positions, opts)


def llama_mlp(config, intermediate_size: int | None = None) -> GatedMLP:
    return GatedMLP(
        config,
        intermediate_size or config.intermediate_size,
        hidden_act(config),
        getattr(config, "mlp_bias", False),
    )


class LlamaForCausalLM(CausalLM):
    def __init__(self, config, max_positions: int):
        super().__init__(config)
        layers = [
            DecoderLayer(config, llama_attention(config, i, max_positions), llama_mlp(config))
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.tie_embeddings()


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 and Phi-4: Llama with fused qkv and gate/up checkpoint tensors
    (split at load) and LongRoPE (layers/rotary.py)."""


class GraniteForCausalLM(CausalLM):
    """Llama with multipliers on the embeddings, attention scores, each
    block's output and the logits."""

    def __init__(self, config, max_positions: int):
        super().__init__(config, logit_scale=1.0 / config.logits_scaling)
        layers = [
            DecoderLayer(
                config,
                llama_attention(config, i, max_positions, scale=config.attention_multiplier),
                llama_mlp(config),
                residual_scale=config.residual_multiplier,
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers, embed_scale=config.embedding_multiplier)
        self.tie_embeddings()
