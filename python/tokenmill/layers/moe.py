"""Mixture-of-experts MLP: a router picks top-k experts per token, and one
FusedMoE layer holds every expert's weights stacked and runs them."""

from __future__ import annotations

import re

import torch
from torch import nn

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill import distributed
from tokenmill.errors import UnsupportedModelError
from tokenmill.layers.activation import GatedActivation
from tokenmill.layers.coded import CodedWeight
from tokenmill.layers.linear import code_weights, coded_form, linear

# Up to this many tokens a step runs the native kernel, which reads each
# routed expert once for all of its tokens; more tokens (prefill) multiply
# each expert's rows through the dense path, BLAS included.
NATIVE_MAX_TOKENS = {"cpu": 16, "cuda": 512}
_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "swiglu_oai": 2}
# checkpoint projection name -> (stacked weight, shard): Mixtral's and Qwen's names
_PROJECTIONS = {
    "w1": ("w13", 0),
    "gate_proj": ("w13", 0),
    "w3": ("w13", 1),
    "up_proj": ("w13", 1),
    "w2": ("w2", None),
    "down_proj": ("w2", None),
}
_STACKED = {"gate_exps": ("w13", 0), "up_exps": ("w13", 1), "down_exps": ("w2", None)}
EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.(weight|bias)$")


def route(logits: torch.Tensor, top_k: int, renormalize: bool, softmax_first: bool = True):
    """(float32 weights, int32 ids) of each token's top-k experts: softmax over
    all experts then top-k (renormalized if asked), or top-k of the logits
    then softmax over those (GPT-OSS)."""
    if softmax_first:
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        top, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top.float(), dim=-1)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


class FusedMoE(nn.Module):
    """All experts of a layer: w13 [experts, 2 * inter, hidden] (gate rows,
    then up rows) and w2 [experts, hidden, inter], with optional biases."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        act: str = "silu",
        bias: bool = False,
        swiglu: tuple[float, float] | None = None,
    ):
        super().__init__()
        if distributed.tp().world > 1:
            raise UnsupportedModelError(
                "mixture-of-experts models do not support tensor parallelism yet"
            )
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported expert activation {act!r}")
        self.num_experts, self.inter = num_experts, inter
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * inter)) if bias else None
        self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.activation = _ACTIVATIONS[act]
        self.gated = None if act == "swiglu_oai" else GatedActivation(act)
        self.swiglu_alpha, self.swiglu_limit = swiglu or (0.0, 0.0)
        self._loaded: set[tuple] = set()
        self._coded: tuple[CodedWeight, CodedWeight] | None = None

    def pack(self) -> None:
        """Coded copies of bfloat16 expert weights for CPU decode steps: w13
        as [experts * 2 * inter, hidden] rows and w2 as [experts * hidden,
        inter], three quarters of their bytes (layers/coded.py)."""
        rows = [self.w13.data.view(-1, self.w13.shape[2]), self.w2.data.view(-1, self.inter)]
        code_weights(rows)
        coded = [coded_form(w) for w in rows]
        self._coded = None if None in coded else tuple(coded)

    def load_expert(
        self, expert: int, projection: str, piece: str, tensor: torch.Tensor
    ) -> set[str]:
        """One expert's projection from a per-expert checkpoint tensor."""
        if projection not in _PROJECTIONS or piece != "weight":
            raise KeyError(f"unexpected expert tensor {projection}.{piece}")
        name, shard = _PROJECTIONS[projection]
        target = getattr(self, name).data[expert]
        if shard is not None:
            target = target[shard * self.inter : (shard + 1) * self.inter]
        target.copy_(tensor)
        self._loaded.add((name, expert, shard))
        needed = 2 * self.num_experts if name == "w13" else self.num_experts
        done = sum(1 for n, *_ in self._loaded if n == name) == needed
        return {name} if done else set()

    def load_tensor(self, piece: str, tensor: torch.Tensor) -> set[str]:
        """Stacked expert tensors: GGUF's gate_exps and up_exps [experts,
        inter, hidden] and down_exps [experts, hidden, inter]; GPT-OSS's
        gate_up_proj [experts, hidden, 2 * inter] with gate and up
        interleaved, down_proj [experts, inter, hidden], and their biases."""
        if piece in _STACKED:
            name, shard = _STACKED[piece]
            target = getattr(self, name).data
            if shard is not None:
                target = target[:, shard * self.inter : (shard + 1) * self.inter]
            target.copy_(tensor)
            self._loaded.add((name, "stacked", shard))
            w13_done = {(n, s) for n, e, s in self._loaded if n == "w13" and e == "stacked"}
            return {name} if name == "w2" or len(w13_done) == 2 else set()
        if piece in ("gate_up_proj", "gate_up_proj_bias"):
            gate_up = tensor.transpose(1, 2) if piece == "gate_up_proj" else tensor
            target = self.w13 if piece == "gate_up_proj" else self.w13_bias
            target.data.copy_(torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1))
            return {"w13" if piece == "gate_up_proj" else "w13_bias"}
        if piece == "down_proj":
            self.w2.data.copy_(tensor.transpose(1, 2))
            return {"w2"}
        if piece == "down_proj_bias":
            self.w2_bias.data.copy_(tensor)
            return {"w2_bias"}
        raise KeyError(f"unexpected expert tensor {piece}")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        native = x.shape[0] <= NATIVE_MAX_TOKENS.get(x.device.type, 0) and not (
            x.device.type == "cpu" and self.w13.dtype == torch.float16
        )
        if native or _capturing(x):
            args = (
                out, x, self.w13, self.w2, weights, ids, self.activation,
                self._bias(self.w13_bias), self._bias(self.w2_bias),
                self.swiglu_alpha, self.swiglu_limit,
            )  # fmt: skip
            if self._coded is not None and x.device.type == "cpu":
                torch.ops.tokenmill.fused_moe_coded(
                    *args, *_fields(self._coded[0]), *_fields(self._coded[1])
                )
            else:
                torch.ops.tokenmill.fused_moe(*args)
            return out
        return self._grouped(x, weights, ids)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Many tokens: each routed expert's rows through the dense path."""
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        order = ids.flatten().argsort(stable=True)
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts).tolist()
        tokens = order // ids.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start : start + n]
            tok = tokens[start : start + n]
            start += n
            gate_up = linear(x[tok], self.w13[e], _opt(self.w13_bias, e, x.dtype))
            h = self._act(gate_up)
            y = linear(h, self.w2[e], _opt(self.w2_bias, e, x.dtype))
            total.index_add_(0, tok, y.float() * weights.flatten()[rows, None])
        return total.to(x.dtype)

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.gated is not None:
            return self.gated(gate_up)
        gate, up = gate_up[:, : self.inter].float(), gate_up[:, self.inter :].float()
        gate, up = (
            gate.clamp(max=self.swiglu_limit),
            up.clamp(-self.swiglu_limit, self.swiglu_limit),
        )
        return ((up + 1) * gate * torch.sigmoid(self.swiglu_alpha * gate)).to(gate_up.dtype)

    @staticmethod
    def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
        return None if bias is None else bias.float()


def _fields(coded: CodedWeight) -> list[torch.Tensor]:
    return [
        coded.low,
        coded.codes,
        coded.table,
        coded.escape_offsets,
        coded.escape_cols,
        coded.escape_values,
    ]


def _opt(bias, e, dtype):
    return None if bias is None else bias[e].to(dtype)


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class SparseMoeBlock(nn.Module):
    """Router and experts, with Qwen2-MoE's optional gated shared expert."""

    def __init__(self, config, experts: FusedMoE, top_k: int, renormalize: bool, shared=None):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, experts.num_experts, bias=False)
        self.experts = experts
        self.top_k, self.renormalize = top_k, renormalize
        self.shared_expert = shared
        if shared is not None:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(linear(x, self.gate.weight), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            gate = torch.sigmoid(linear(x, self.shared_expert_gate.weight))
            out = out + gate * self.shared_expert(x)
        return out
