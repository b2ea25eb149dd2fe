"""Attention: the paged attention layer (writes the step's K/V into the
cache, then attends) and the decoder block around it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenmill import distributed
from tokenmill.layers.linear import row_parallel
from tokenmill.layers.quantization import QuantConfig, make_linear, make_merged_linear
from tokenmill.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Step inputs that every attention layer shares."""

    slot_mapping: torch.Tensor  # int32 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    num_decode_seqs: int = 0  # the first sequences are decoding ones (a token, perhaps drafts)


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int = 0,
        softcap: float = 0.0,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale, self.sliding_window, self.softcap = scale, sliding_window or 0, softcap or 0.0
        self.sinks: torch.Tensor | None = None
        self.key_cache: torch.Tensor | None = None  # set by the model runner
        self.value_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        torch.ops.tokenmill.reshape_and_cache(
            k, v, self.key_cache, self.value_cache, meta.slot_mapping
        )
        out = torch.empty(
            q.shape[0], self.num_heads * self.head_size, dtype=q.dtype, device=q.device
        )
        torch.ops.tokenmill.paged_attention(
            out,
            q,
            self.key_cache,
            self.value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            self.sliding_window,
            self.softcap,
            None,
            None if self.sinks is None else self.sinks.float(),
            meta.num_decode_seqs,
        )
        return out


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


def layer_type(config, layer_idx: int) -> str:
    """ "sliding_attention" or "full_attention" for this layer."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[layer_idx]
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return "full_attention"
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


@dataclass
class AttentionOptions:
    """What varies between the attention blocks of decoder models."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head": per head; "full": over the whole projection
    norm: type[nn.Module] | None = None  # the q/k norm's class
    scale: float | None = None  # default: head_dim ** -0.5
    softcap: float = 0.0
    rope_per_layer_type: bool = False  # a rope table for each layer type (Gemma 3)
    sinks: bool = False  # a learned softmax sink per head (GPT-OSS)


class Attention(nn.Module):
    """QKV projection, optional q/k norms, rotary embedding, paged attention
    (sliding window where the layer has one) and the output projection."""

    def __init__(self, config, layer_idx: int, max_positions: int, opts: AttentionOptions):
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads, self.num_kv_heads, self.kv_head_start = tp_heads(total_heads, total_kv)
        d = self.head_dim
        self.sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        quant = QuantConfig.from_hf(getattr(config, "quantization_config", None))
        self.qkv_proj = make_merged_linear(
            config.hidden_size, dict(zip("qkv", self.sizes, strict=True)), opts.qkv_bias, quant
        )
        self.qkv_proj.tp_shard = self._qkv_shard
        self.qkv_proj.checkpoint_sizes = [total_heads * d, total_kv * d, total_kv * d]
        self.o_proj = row_parallel(
            make_linear(self.sizes[0], config.hidden_size, opts.o_bias, quant)
        )
        self.qk_norm = opts.qk_norm
        if opts.qk_norm == "full":
            if distributed.tp().world > 1:
                raise ValueError("q/k norms over all heads do not support tensor parallelism yet")
            self.q_norm = opts.norm(self.sizes[0], config.rms_norm_eps)
            self.k_norm = opts.norm(self.sizes[1], config.rms_norm_eps)
        elif opts.qk_norm == "head":
            self.q_norm = opts.norm(d, config.rms_norm_eps)
            self.k_norm = opts.norm(d, config.rms_norm_eps)
        kind = layer_type(config, layer_idx)
        self.rotary = RotaryEmbedding(
            config, d, max_positions, layer_type=kind if opts.rope_per_layer_type else None
        )
        window = config.sliding_window if kind == "sliding_attention" else 0
        scale = opts.scale if opts.scale is not None else d**-0.5
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, d, scale, window, opts.softcap or 0.0
        )
        if opts.sinks:
            if distributed.tp().world > 1:
                raise ValueError("attention sinks do not support tensor parallelism yet")
            self.attn.sinks = nn.Parameter(torch.empty(self.num_heads))

    def _qkv_shard(self, piece: str, shard, tensor: torch.Tensor) -> torch.Tensor:
        group, d = distributed.tp(), self.head_dim
        if shard == "q":
            return tensor[group.rank * self.num_heads * d : (group.rank + 1) * self.num_heads * d]
        start = self.kv_head_start * d
        return tensor[start : start + self.num_kv_heads * d]

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        if self.qk_norm == "head":
            # Per-head views of the fused output: the norm reads them in place.
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        elif self.qk_norm == "full":
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        self.rotary(positions, q, k)
        return distributed.all_reduce(self.o_proj(self.attn(q, k, v, meta)))
