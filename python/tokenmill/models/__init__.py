"""Model implementations, looked up by ``config.architectures``."""

from __future__ import annotations

from tokenmill.errors import UnsupportedModelError

_REGISTRY = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "GPT2LMHeadModel": ("tokenmill.models.gpt2", "GPT2LMHeadModel"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(config):
    import importlib

    for arch in getattr(config, "architectures", None) or []:
        if arch in _REGISTRY:
            module, name = _REGISTRY[arch]
            return getattr(importlib.import_module(module), name)
    raise UnsupportedModelError(
        f"unsupported architecture {getattr(config, 'architectures', None)}; "
        f"tokenmill supports {', '.join(supported_architectures())}"
    )
