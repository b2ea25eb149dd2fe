"""The decoder-only transformer that most models are: embeddings, a stack of
layers, a final norm and the LM head, with one checkpoint loader. A model
file supplies its decoder layer and the few settings that differ."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill import distributed
from tokenmill.layers.attention import Attention, AttentionMetadata, PagedAttention
from tokenmill.layers.gguf_linear import GGUFBlocks, GGUFLinear
from tokenmill.layers.moe import EXPERT_TENSOR
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.quantization import Int4Linear
from tokenmill.layers.vocab_parallel import VocabParallelEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals. `sandwich` adds Gemma 2's
    norms of each block's output before its residual add; `residual_scale`
    (Granite) scales each block's output."""

    def __init__(
        self,
        config,
        attn: Attention,
        mlp: nn.Module,
        norm: type[nn.Module] = RMSNorm,
        sandwich: bool = False,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = norm(h, eps)
        self.post_attention_layernorm = norm(h, eps)
        self.sandwich = sandwich
        if sandwich:
            self.pre_feedforward_layernorm = norm(h, eps)
            self.post_feedforward_layernorm = norm(h, eps)
        self.residual_scale = residual_scale

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self._scaled(self.self_attn(positions, x, meta))
        if self.sandwich:
            x = self.post_attention_layernorm(x)
            x, residual = self.pre_feedforward_layernorm(x, residual)
            return self._scaled(self.post_feedforward_layernorm(self.mlp(x))), residual
        x, residual = self.post_attention_layernorm(x, residual)
        return self._scaled(self.mlp(x)), residual

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.residual_scale == 1.0 else x.mul_(self.residual_scale)


class DecoderModel(nn.Module):
    def __init__(self, config, layers: Iterable[nn.Module], norm=RMSNorm, embed_scale=1.0):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.tp_shard = lambda piece, shard, t: self.embed_tokens.shard(t)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = embed_scale

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            # In the weights' dtype, as the reference rounds it.
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        if residual is None:  # post-norm layers (OLMo 2) carry no residual
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Base of decoder-only models. Subclasses build `self.model` (a
    DecoderModel) in `__init__` after calling this one, and may set:

    stacked: checkpoint name fragment -> (merged parameter fragment, shard id)
    renames: checkpoint name fragment -> parameter name fragment
    ignored: checkpoint name fragments that load nowhere
    """

    stacked = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    renames: dict[str, str] = {}
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, config, logit_softcap: float = 0.0, logit_scale: float = 1.0):
        super().__init__()
        self.config = config
        self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.lm_head.tp_shard = lambda piece, shard, t: self.lm_head.shard(t)
        self.logit_softcap = logit_softcap or 0.0
        self.logit_scale = logit_scale
        if distributed.tp().world > 1 and getattr(config, "quantization_config", None):
            raise ValueError("tensor parallelism does not support quantized checkpoints yet")

    def tie_embeddings(self) -> None:
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids, positions, meta: AttentionMetadata):
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.logits(hidden)
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.logit_softcap:
            logits = torch.tanh(logits.div_(self.logit_softcap)).mul_(self.logit_softcap)
        return logits

    @property
    def logits_weight(self) -> torch.Tensor:
        """On one rank, compute_logits(h) is an increasing function of
        linear(h, logits_weight).float(): the same argmax."""
        assert self.logit_scale > 0
        return self.lm_head.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors into parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        tied = getattr(self.config, "tie_word_embeddings", False)
        for name, tensor in weights:
            if any(f in name for f in self.ignored) or (name == "lm_head.weight" and tied):
                continue
            for old, new in self.renames.items():
                name = name.replace(old, new)
            expert = EXPERT_TENSOR.match(name)
            if expert and isinstance(tensor, GGUFBlocks):
                tensor = tensor.dequantize()
            if expert:  # one expert's projection, into the layer's stacked weights
                experts, index, projection, piece = expert.groups()
                module = self.get_submodule(experts)
                names = module.load_expert(int(index), projection, piece, tensor)
                loaded |= {f"{experts}.{n}" for n in names}
                continue
            module_name, piece = name.rsplit(".", 1)
            shard = None
            for fragment, (merged, shard_id) in self.stacked.items():
                if module_name.endswith(f".{fragment}"):
                    module_name, shard = module_name[: -len(fragment)] + merged, shard_id
                    break
            try:
                module = self.get_submodule(module_name)
            except AttributeError:
                raise KeyError(f"unexpected checkpoint tensor {name}") from None
            if isinstance(tensor, GGUFBlocks) and isinstance(module, VocabParallelEmbedding):
                module.load_blocks(tensor)
                loaded.add(f"{module_name}.{piece}")
                continue
            if isinstance(tensor, GGUFBlocks) and not isinstance(module, GGUFLinear):
                tensor = tensor.dequantize()  # layers that keep floats (embeddings, routers)
            if hasattr(module, "load_tensor"):  # stacked expert tensors (GPT-OSS)
                loaded |= {f"{module_name}.{n}" for n in module.load_tensor(piece, tensor)}
                continue
            pieces = _fused_pieces(module, name, piece, tensor) if shard is None else None
            for shard_id, part in pieces or [(shard, tensor)]:
                loaded |= self._load_piece(module, module_name, piece, shard_id, part, params)
        for module_name, module in self.named_modules():
            if isinstance(module, (Int4Linear, GGUFLinear)) and module.loaded_shards != set(
                module.shards
            ):
                raise KeyError(f"quantized weights of {module_name} are incomplete")
        # A tied weight is loaded under either name; report the one named_parameters() gives.
        canonical = {id(p): n for n, p in self.named_parameters()}
        return {canonical.get(id(params.get(n)), n) for n in loaded}

    def _load_piece(self, module, module_name, piece, shard, tensor, params) -> set[str]:
        if distributed.tp().world > 1 and hasattr(module, "tp_shard"):
            tensor = module.tp_shard(piece, shard, tensor)
        target = f"{module_name}.{piece}"
        if isinstance(module, GGUFLinear):
            module.load_shard(piece, shard, tensor)
            return {target}
        if isinstance(module, Int4Linear):
            module.load_shard(piece, shard, tensor)
            return {target} if piece == "bias" else set()
        if shard is not None:
            module.load_shard(piece, shard, tensor)
            return {target}
        if target not in params:
            raise KeyError(f"unexpected checkpoint tensor {target}")
        param = params[target]
        getattr(param, "weight_loader", _copy)(param, tensor)
        return {target}


def _fused_pieces(module, name: str, piece: str, tensor: torch.Tensor):
    """[(shard, tensor)] of a checkpoint tensor that holds a merged layer's
    shards fused (Phi-3's qkv_proj, gate_up_proj), or None."""
    if not hasattr(module, "checkpoint_sizes") or piece not in ("weight", "bias"):
        return None
    if isinstance(module, Int4Linear):
        raise KeyError(f"fused quantized projection {name} is not supported")
    if isinstance(tensor, GGUFBlocks):
        return list(zip(module.shards, tensor.split(module.checkpoint_sizes), strict=True))
    return list(zip(module.shards, tensor.split(module.checkpoint_sizes), strict=True))


def _copy(param: torch.Tensor, tensor: torch.Tensor) -> None:
    param.data.copy_(tensor)


def sqrt_hidden(config) -> float:
    return math.sqrt(config.hidden_size)
