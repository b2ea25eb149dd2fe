"""Llama and its close relatives: Mistral (sliding window), Qwen2 (QKV bias)
and Qwen3 (per-head q/k norm)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill import distributed
from tokenmill.layers.attention import AttentionMetadata, PagedAttention
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.quantization import Int4Linear, QuantConfig, make_linear, make_merged_linear
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.layers.vocab_parallel import VocabParallelEmbedding


def tp_heads(heads: int, kv_heads: int) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head) of this rank. KV heads that the
    world size does not divide are replicated when that keeps every query
    head with its own KV head."""
    group = distributed.tp()
    if heads % group.world:
        raise ValueError(
            f"tensor_parallel_size {group.world} must divide num_attention_heads ({heads})"
        )
    local = heads // group.world
    if kv_heads % group.world == 0:
        kv_local = kv_heads // group.world
        return local, kv_local, group.rank * kv_local
    if group.world % kv_heads == 0:
        return local, 1, group.rank * kv_heads // group.world
    raise ValueError(
        f"tensor_parallel_size {group.world} neither divides nor is a multiple of num_key_value_heads ({kv_heads})"
    )


def _sliding_window(config, layer_idx: int) -> int:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else 0
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return 0
    return getattr(config, "sliding_window", None) or 0


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_positions: int):
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads, self.num_kv_heads, self.kv_head_start = tp_heads(total_heads, total_kv)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        quant = QuantConfig.from_hf(getattr(config, "quantization_config", None))
        self.qkv_proj = make_merged_linear(
            config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, qkv_bias, quant
        )
        self.o_proj = make_linear(
            q_size, config.hidden_size, getattr(config, "attention_bias", False), quant
        )
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, self.head_dim, max_positions)
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            _sliding_window(config, layer_idx),
        )

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        if self.qk_norm:
            # Per-head views of the fused output: the norm reads them in place.
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        self.rotary(positions, q, k)
        return distributed.all_reduce(self.o_proj(self.attn(q, k, v, meta)))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter = distributed.split(config.intermediate_size, "intermediate_size")
        bias = getattr(config, "mlp_bias", False)
        quant = QuantConfig.from_hf(getattr(config, "quantization_config", None))
        self.gate_up_proj = make_merged_linear(
            config.hidden_size, {0: inter, 1: inter}, bias, quant
        )
        self.down_proj = make_linear(inter, config.hidden_size, bias, quant)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=x.dtype, device=x.device)
        torch.ops.tokenmill.silu_and_mul(act, gate_up)
        return distributed.all_reduce(self.down_proj(act))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_positions: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, max_positions)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_positions: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, max_positions) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (merged parameter fragment, shard id)
    stacked = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, max_positions: int):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions)
        self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        if distributed.tp().world > 1 and getattr(config, "quantization_config", None):
            raise ValueError("tensor parallelism does not support quantized checkpoints yet")

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids, positions, meta):
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    @property
    def logits_weight(self) -> torch.Tensor:
        """On one rank, compute_logits(h) is linear(h, logits_weight).float()."""
        return self.lm_head.weight

    def _shard(self, module_name: str, piece: str, shard, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor."""
        group = distributed.tp()
        if group.world == 1:
            return tensor
        if module_name.endswith(("embed_tokens", "lm_head")):
            return self.get_submodule(module_name).shard(tensor)
        if module_name.endswith("qkv_proj"):
            attn = self.get_submodule(module_name.rsplit(".", 1)[0])
            d = attn.head_dim
            if shard == "q":
                return tensor[
                    group.rank * attn.num_heads * d : (group.rank + 1) * attn.num_heads * d
                ]
            start = attn.kv_head_start * d
            return tensor[start : start + attn.num_kv_heads * d]
        if module_name.endswith("gate_up_proj"):
            n = tensor.shape[0] // group.world
            return tensor[group.rank * n : (group.rank + 1) * n]
        if module_name.endswith(("o_proj", "down_proj")):
            if piece == "bias":  # added once, by rank 0, before the sum
                return tensor if group.rank == 0 else torch.zeros_like(tensor)
            n = tensor.shape[1] // group.world
            return tensor[:, group.rank * n : (group.rank + 1) * n]
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors into parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                continue
            module_name, piece = name.rsplit(".", 1)
            shard = None
            for fragment, (merged, shard_id) in self.stacked.items():
                if module_name.endswith(f".{fragment}"):
                    module_name, shard = module_name[: -len(fragment)] + merged, shard_id
                    break
            module = self.get_submodule(module_name)
            tensor = self._shard(module_name, piece, shard, tensor)
            if isinstance(module, Int4Linear):
                module.load_shard(piece, shard, tensor)
                if piece == "bias":
                    loaded.add(f"{module_name}.bias")
            elif shard is not None:
                module.load_shard(piece, shard, tensor)
                loaded.add(f"{module_name}.{piece}")
            else:
                target = f"{module_name}.{piece}"
                if target not in params:
                    raise KeyError(f"unexpected checkpoint tensor {name}")
                params[target].data.copy_(tensor)
                loaded.add(target)
        for module_name, module in self.named_modules():
            if isinstance(module, Int4Linear) and module.loaded_shards != set(module.shards):
                raise KeyError(f"quantized weights of {module_name} are incomplete")
        return loaded
