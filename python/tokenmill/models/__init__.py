"""Model implementations, looked up by ``config.architectures``."""

from __future__ import annotations

from tokenmill.errors import UnsupportedModelError

_REGISTRY = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("tokenmill.models.llama", "Phi3ForCausalLM"),
    "GraniteForCausalLM": ("tokenmill.models.llama", "GraniteForCausalLM"),
    "GemmaForCausalLM": ("tokenmill.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("tokenmill.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("tokenmill.models.gemma", "GemmaForCausalLM"),
    "Olmo2ForCausalLM": ("tokenmill.models.olmo2", "Olmo2ForCausalLM"),
    "MixtralForCausalLM": ("tokenmill.models.moe", "MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("tokenmill.models.moe", "MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("tokenmill.models.moe", "MoeForCausalLM"),
    "GptOssForCausalLM": ("tokenmill.models.gpt_oss", "GptOssForCausalLM"),
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
