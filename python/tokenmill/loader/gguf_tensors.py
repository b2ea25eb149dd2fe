"""A GGUF file's tensors under Hugging Face checkpoint names, read in place.

llama.cpp's converter renames tensors (`blk.N.attn_q`), stacks experts
([experts, out, in] per projection), permutes Llama's q/k rows for its
interleaved rotary embedding and stores Gemma's norms as 1 + w; each is
undone here so the models load these tensors as they load safetensors.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.layers.gguf_linear import GGUFBlocks, dequantize_gguf
from tokenmill.loader.gguf_file import GGUFFile

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_sinks": "self_attn.sinks",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_exps",
    "ffn_up_exps": "mlp.experts.up_exps",
    "ffn_down_exps": "mlp.experts.down_exps",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Where an architecture's names differ from the table above.
_ARCH_LAYER = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # gate and up, fused
}
_GEMMA = ("gemma", "gemma2", "gemma3")
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFTensors:
    def __init__(self, path: str):
        self.file = GGUFFile(path)
        self.arch = self.file.arch
        self.by_name = {t.name: t for t in self.file.tensors}

    def has(self, name: str) -> bool:
        return name in self.by_name

    def hf_name(self, name: str) -> str | None:
        """The Hugging Face checkpoint name of a GGUF tensor; None for tensors
        the models compute themselves (rotary factors)."""
        stem, _, piece = name.rpartition(".")
        if stem in _TOP:
            return f"{_TOP[stem]}.{piece}"
        m = _LAYER_TENSOR.match(name)
        if m is None:
            if name.startswith("rope_"):
                return None
            raise ModelLoadError(
                f"GGUF tensor {name} has no counterpart in tokenmill's {self.arch}"
            )
        layer, kind, piece = m.groups()
        table = _ARCH_LAYER.get(self.arch, {})
        target = table.get(kind) or _LAYER.get(kind)
        if target is None:
            raise ModelLoadError(
                f"GGUF tensor {name} has no counterpart in tokenmill's {self.arch}"
            )
        if target.startswith("mlp.experts."):  # stacked: named as GPT-OSS's are
            return f"model.layers.{layer}.{target}" + ("" if piece == "weight" else "_bias")
        return f"model.layers.{layer}.{target}.{piece}"

    def iterate(self, config, blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor) for every tensor of the file: float32 or
        float16, or with `blocks` quantized tensors as GGUFBlocks."""
        from gguf import GGMLQuantizationType as Q

        for t in tqdm(self.file.tensors, desc="Loading GGUF tensors", unit="tensor", leave=False):
            name = self.hf_name(t.name)
            if name is None:
                continue
            qtype = Q(t.qtype)
            array = self.file.data(t)
            if blocks and qtype not in (Q.F32, Q.F16) and len(t.shape) == 2:
                data = GGUFBlocks(_tensor(array), int(qtype), t.shape[1])
                yield name, self._undo_conversion(t.name, data, config)
                continue
            tensor = (
                _tensor(array)
                if qtype in (Q.F32, Q.F16)
                else dequantize_gguf(array, int(qtype), t.shape, f"tensor {t.name}")
            )
            yield name, self._undo_conversion(t.name, tensor, config)

    def _undo_conversion(self, name: str, tensor, config):
        if self.arch in _GEMMA and name.endswith("norm.weight"):
            return tensor - 1
        if self.arch in ("llama", "granite") and re.search(r"\.attn_[qk]\.weight$", name):
            heads = config.num_attention_heads
            if ".attn_k." in name:
                heads = getattr(config, "num_key_value_heads", None) or heads
            if isinstance(tensor, GGUFBlocks):  # whole rows of blocks move
                return GGUFBlocks(_unpermute(tensor.data, heads), tensor.ggml_type, tensor.k)
            return _unpermute(tensor, heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            return tensor.reshape(1, -1)
        return tensor


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only mapped data, only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's permutation of Llama's q/k rows (interleaved rotary pairs)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
