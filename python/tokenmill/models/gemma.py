"""Gemma, Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms, embeddings scaled by
sqrt(hidden), a GELU-tanh MLP; Gemma 2 and 3 add norms after each block,
sliding-window layers and `query_pre_attn_scalar`; Gemma 2 softcaps attention
scores and logits; Gemma 3 norms q and k per head and has a rope per layer
type (local and global)."""

from __future__ import annotations

from tokenmill.layers.activation import hidden_act
from tokenmill.layers.attention import Attention, AttentionOptions
from tokenmill.layers.mlp import GatedMLP
from tokenmill.layers.norm import GemmaRMSNorm
from tokenmill.models.decoder import CausalLM, DecoderLayer, DecoderModel, sqrt_hidden


class GemmaForCausalLM(CausalLM):
    def __init__(self, config, max_positions: int):
        super().__init__(config, logit_softcap=getattr(config, "final_logit_softcapping", 0))
        later = config.model_type != "gemma"  # Gemma 2 and 3
        gemma3 = config.model_type == "gemma3_text"
        scalar = getattr(config, "query_pre_attn_scalar", None)
        opts = AttentionOptions(
            qkv_bias=getattr(config, "attention_bias", False),
            o_bias=getattr(config, "attention_bias", False),
            qk_norm="head" if gemma3 else None,
            norm=GemmaRMSNorm,
            scale=scalar**-0.5 if later and scalar else None,
            softcap=getattr(config, "attn_logit_softcapping", None) or 0.0,
            rope_per_layer_type=gemma3,
        )
        layers = [
            DecoderLayer(
                config,
                Attention(config, i, max_positions, opts),
                GatedMLP(config, config.intermediate_size, hidden_act(config)),
                norm=GemmaRMSNorm,
                sandwich=later,
            )
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers, GemmaRMSNorm, embed_scale=sqrt_hidden(config))
        self.tie_embeddings()
