"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (with a gated shared
expert) and Qwen3-MoE (per-head q/k norms). Llama attention; the MLP of
each sparse layer is a router and one FusedMoE."""

from __future__ import annotations

from tokenmill.layers.activation import hidden_act
from tokenmill.layers.moe import FusedMoE, SparseMoeBlock
from tokenmill.models.decoder import CausalLM, DecoderLayer, DecoderModel
from tokenmill.models.llama import llama_attention, llama_mlp


def _num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def moe_mlp(config, layer_idx: int):
    """The layer's sparse MLP, or a dense one where Qwen2/3-MoE configs say so."""
    sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []) or (
        (layer_idx + 1) % sparse_step
    ):
        return llama_mlp(config)
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = FusedMoE(_num_experts(config), config.hidden_size, inter, hidden_act(config))
    shared_size = getattr(config, "shared_expert_intermediate_size", None)
    shared = llama_mlp(config, shared_size) if shared_size else None
    renormalize = config.model_type == "mixtral" or getattr(config, "norm_topk_prob", False)
    return SparseMoeBlock(config, experts, config.num_experts_per_tok, renormalize, shared)


class MoeForCausalLM(CausalLM):
    renames = {".block_sparse_moe.": ".mlp."}  # Mixtral's name for the sparse MLP

    def __init__(self, config, max_positions: int):
        super().__init__(config)
        layers = [
            DecoderLayer(config, llama_attention(config, i, max_positions), moe_mlp(config, i))
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.tie_embeddings()
