"""Model configs read straight from config.json.

transformers omits values equal to a config class's defaults when it saves a
config, so each supported model type carries those defaults here (a test
checks them against transformers). Reading JSON directly keeps start-up free
of transformers' import cost; other supported types load through
transformers' config classes.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from tokenmill.errors import ModelLoadError, UnsupportedModelError

_COMMON = dict(
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rope_scaling=None,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    head_dim=None,
    rms_norm_eps=1e-6,
    num_key_value_heads=None,
    partial_rotary_factor=1.0,
    sliding_window=None,
    layer_types=None,
    bos_token_id=None,
    eos_token_id=None,
)

DEFAULTS = {
    "llama": dict(
        _COMMON,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
    ),
    "mistral": dict(
        _COMMON,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        sliding_window=4096,
    ),
    "qwen2": dict(
        _COMMON,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=32768,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "qwen3": dict(
        _COMMON,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=32768,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "gpt2": dict(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
}


def _transformers_config(path: str, model_type: str):
    """transformers' own config class, for model types whose configs derive
    values as they load (Gemma 3's layer types, Phi-3's rope): about a second
    more start-up than the table above, and nothing to keep in step."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r}: {e}") from e


class ModelConfig(SimpleNamespace):
    """Attribute access to a config.json with its model type's defaults filled in."""


def load_config(path: str) -> ModelConfig:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise ModelLoadError(f"no config.json in {path}")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from e
    if "text_config" in raw and "model_type" not in raw.get("text_config", {}):
        raw = {**raw, **raw["text_config"]}
    model_type = raw.get("model_type")
    from tokenmill.models import model_class

    values = {**DEFAULTS.get(model_type, {}), **raw}
    values.setdefault("architectures", None)
    config = ModelConfig(**values)
    if model_type not in DEFAULTS:
        model_class(config)  # raises UnsupportedModelError naming what is supported
        return _transformers_config(path, model_type)
    if getattr(config, "num_key_value_heads", None) is None and hasattr(
        config, "num_attention_heads"
    ):
        config.num_key_value_heads = config.num_attention_heads
    if isinstance(getattr(config, "rope_scaling", None), dict) and "type" in config.rope_scaling:
        config.rope_scaling.setdefault("rope_type", config.rope_scaling["type"])
    return config
