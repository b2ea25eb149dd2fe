"""GGUF checkpoints. The engine reads a GGUF file's tensors in place
(memory-mapped, `loader/gguf_tensors.py`); its config, tokenizer and chat
template, which transformers takes tens of seconds to parse from the file's
metadata, are kept once in a small folder under the tokenmill cache.

`gguf_to_hf` writes a full Hugging Face folder, weights dequantized by
transformers: the reference that tests and peers read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)


def cache_root() -> str:
    base = os.environ.get("TOKENMILL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tokenmill"
    )
    return os.path.join(base, "gguf")


def _cache_path(gguf_file: str, kind: str) -> str:
    st = os.stat(gguf_file)
    key = hashlib.sha256(
        f"{os.path.abspath(gguf_file)}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    name = os.path.basename(gguf_file).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{name}-{key}{kind}")


def converted_path(gguf_file: str) -> str:
    return _cache_path(gguf_file, "")


def metadata_path(gguf_file: str) -> str:
    return _cache_path(gguf_file, "-meta")


def _hf_config_and_tokenizer(gguf_file: str):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_file}: {e}") from e
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    if not config.architectures:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")]
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config, tokenizer


def _publish(out: str, write) -> str:
    """Writes a cache folder through a temporary one, so that readers see it whole."""
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_root())
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(out):
            raise
    return out


def gguf_metadata(gguf_file: str) -> str:
    """A folder with the GGUF file's config and tokenizer (no weights)."""
    out = metadata_path(gguf_file)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    logger.info("reading the config and tokenizer of %s (first load only)", gguf_file)

    from tokenmill.loader.gguf_tensors import GGUFTensors

    config, tokenizer = _hf_config_and_tokenizer(gguf_file)
    config.tie_word_embeddings = not GGUFTensors(gguf_file).has("output.weight")

    def write(tmp):
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)

    return _publish(out, write)


def gguf_to_hf(gguf_file: str) -> str:
    """A Hugging Face folder holding the checkpoint as transformers dequantizes it."""
    out = converted_path(gguf_file)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    logger.info("converting %s with transformers", gguf_file)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config, tokenizer = _hf_config_and_tokenizer(gguf_file)
    folder, name = os.path.split(os.path.abspath(gguf_file))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    config.tie_word_embeddings = model.config.tie_word_embeddings
    config.dtype = torch.float32
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not config.tie_word_embeddings
    }

    def write(tmp):
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})

    return _publish(out, write)
