"""GGUF checkpoints, dequantized once into a cached Hugging Face folder.

Reading a GGUF file's tokenizer and dequantizing its weights takes tens of
seconds, so the converted folder (config, tokenizer, safetensors) is kept
under the tokenmill cache and later loads read it directly.
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


def converted_path(gguf_file: str) -> str:
    st = os.stat(gguf_file)
    key = hashlib.sha256(
        f"{os.path.abspath(gguf_file)}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    name = os.path.basename(gguf_file).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{name}-{key}")


def gguf_to_hf(gguf_file: str) -> str:
    """A Hugging Face folder holding the dequantized GGUF checkpoint."""
    out = converted_path(gguf_file)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    logger.info("converting %s (first load only)", gguf_file)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_file}: {e}") from e
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(model).__name__]
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.dtype = torch.float32
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not config.tie_word_embeddings
    }

    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_root())
    try:
        from safetensors.torch import save_file

        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(out, "model.safetensors")):
            raise
    return out
