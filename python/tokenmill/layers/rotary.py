"""Rotary position embedding and its cos/sin table for each rope scaling type."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """Rope settings of a transformers config, old-style or new-style; models
    with a rope per layer type (Gemma 3: sliding and full attention) key them
    by `layer_type`."""
    params = dict(getattr(config, "rope_scaling", None) or {})
    new_style = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and layer_type in new_style:
        new_style = new_style[layer_type]
    params.update(new_style)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _yarn_inv_freq(p: dict, base: float, dim: int, orig_max: int) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)

    def correction_dim(rotations):
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):  # GPT-OSS keeps the exact range
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _inv_freq(base, dim)
    interpolation = extrapolation / factor
    inv = interpolation * ramp + extrapolation * (1 - ramp)

    def yarn_mscale(scale=1.0):
        return 0.1 * scale * math.log(factor) + 1.0 if factor > 1 else 1.0

    mscale = p.get("attention_factor")
    if mscale is None and p.get("mscale") and p.get("mscale_all_dim"):
        mscale = yarn_mscale(p["mscale"]) / yarn_mscale(p["mscale_all_dim"])
    return inv, mscale if mscale is not None else yarn_mscale()


def _llama3_inv_freq(p: dict, base: float, dim: int) -> torch.Tensor:
    inv = _inv_freq(base, dim)
    factor, low_f, high_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    orig = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / low_f, orig / high_f
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low_f) / (high_f - low_f)
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def _longrope_inv_freq(p: dict, config, base: float, dim: int, max_positions: int):
    """LongRoPE (Phi-3): the short factors where sequences stay within the
    original context, else the long ones, for every position. transformers
    switches a sequence to the long factors once it outgrows the original
    context and recomputes all of its keys; a paged cache keeps keys, so the
    choice is made once, by the longest sequence the engine will hold
    (max_model_len): a request's keys never change, and prefix-cache hits
    stay exact."""
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or config.max_position_embeddings / orig
    mscale = p.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
    )
    ext = p["long_factor"] if max_positions > orig else p["short_factor"]
    return _inv_freq(base, dim) / torch.tensor(ext, dtype=torch.float64), mscale


def build_cos_sin_cache(
    config, rot_dim: int, max_positions: int, layer_type: str | None = None
) -> torch.Tensor:
    """float32 [max_positions, rot_dim]: cos of each frequency, then sin."""
    p = rope_parameters(config, layer_type)
    base, kind = float(p["rope_theta"]), p["rope_type"]
    orig_max = p.get("original_max_position_embeddings") or getattr(
        config, "max_position_embeddings", max_positions
    )
    mscale = 1.0
    positions = torch.arange(max_positions, dtype=torch.float64)
    if kind == "default":
        inv = _inv_freq(base, rot_dim)
    elif kind == "linear":
        inv = _inv_freq(base, rot_dim)
        positions = positions / p["factor"]
    elif kind == "dynamic":
        factor = p["factor"]
        length = max(max_positions, orig_max)
        base = base * ((factor * length / orig_max) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
        inv = _inv_freq(base, rot_dim)
    elif kind == "yarn":
        inv, mscale = _yarn_inv_freq(p, base, rot_dim, orig_max)
    elif kind == "llama3":
        inv = _llama3_inv_freq(p, base, rot_dim)
    elif kind == "longrope":
        inv, mscale = _longrope_inv_freq(p, config, base, rot_dim, max_positions)
    else:
        raise ValueError(f"unsupported rope_type {kind!r}")
    freqs = torch.outer(positions, inv)
    return torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1).float()


_tables: dict[tuple, torch.Tensor] = {}


def rotary_dim(config, head_size: int, layer_type: str | None = None) -> int:
    factor = rope_parameters(config, layer_type).get("partial_rotary_factor")
    return int(head_size * (factor or getattr(config, "partial_rotary_factor", None) or 1.0))


class RotaryEmbedding(nn.Module):
    """Rotates query and key in place at the given positions. Layers with the
    same rope share one table."""

    def __init__(
        self,
        config,
        head_size: int,
        max_positions: int,
        is_neox: bool = True,
        layer_type: str | None = None,
    ):
        super().__init__()
        self.head_size = head_size
        rot_dim = rotary_dim(config, head_size, layer_type)
        key = (id(config), repr(rope_parameters(config, layer_type)), rot_dim, max_positions)
        if key not in _tables:
            if any(k[0] != id(config) for k in _tables):
                _tables.clear()  # an earlier model's
            _tables[key] = build_cos_sin_cache(config, rot_dim, max_positions, layer_type)
        self.register_buffer("cos_sin_cache", _tables[key], persistent=False)
        self.is_neox = is_neox

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        torch.ops.tokenmill.rotary_embedding(
            positions, q, k, self.head_size, self.cos_sin_cache, self.is_neox
        )
