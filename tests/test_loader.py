"""Config, tokenizer and checkpoint loading against transformers."""

import pytest
import torch
from tokenmill.errors import ModelLoadError, UnsupportedModelError
from tokenmill.loader.config import DEFAULTS, load_config
from tokenmill.loader.hf import resolve_model_path
from tokenmill.loader.tokenizer import FastTokenizer

CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gpt2": "GPT2Config",
}
FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "sliding_window",
    "use_sliding_window",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
]


@pytest.mark.parametrize("model_type", sorted(DEFAULTS))
def test_config_defaults_match_transformers(model_type, tmp_path):
    import transformers

    hf = getattr(transformers, CLASSES[model_type])()
    hf.architectures = ["X"]
    hf.save_pretrained(tmp_path)  # drops values equal to the class defaults
    ours = load_config(str(tmp_path))
    for name in FIELDS:
        if hasattr(hf, name) and name in DEFAULTS[model_type] | {"num_key_value_heads": 0}:
            assert getattr(ours, name) == getattr(hf, name), name


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "fancy", "architectures": ["FancyForCausalLM"]}'
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        load_config(str(tmp_path))


def test_missing_paths_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_config(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError):
        resolve_model_path("no-such-org/no-such-model-xyz")


TEXTS = [
    "Hello world",
    " leading space",
    "Héllo wörld, ça va? 東京 🙂",
    "line\n\nbreaks\ttabs",
    "x" * 50,
]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_fast_tokenizer_matches_transformers(which, tiny_model, request):
    from transformers import AutoTokenizer

    path = tiny_model("llama") if which == "tiny" else request.getfixturevalue("smollm2_path")
    ours, ref = FastTokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(ref), (200,), generator=g).tolist()
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    for gen in (True, False):
        expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == list(expected)
    assert (ours.eos_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)


@pytest.mark.slow
def test_gguf_tensors_read_natively_match_transformers(smollm2_path):
    """The engine reads a GGUF file's tensors itself (names mapped, Llama's
    q/k permutation undone): exactly the tensors transformers dequantizes."""
    from safetensors import safe_open
    from tokenmill.loader.gguf import gguf_metadata
    from tokenmill.loader.gguf_tensors import GGUFTensors
    from tokenmill.loader.hf import default_model_path

    gguf_file = default_model_path()
    ours = dict(GGUFTensors(gguf_file).iterate(load_config(gguf_metadata(gguf_file))))
    with safe_open(f"{smollm2_path}/model.safetensors", "pt") as ref:
        assert set(ref.keys()) == set(ours)
        for name in ref.keys():
            assert torch.equal(ours[name].float(), ref.get_tensor(name)), name


def test_gguf_tensor_without_a_counterpart_is_named(tmp_path):
    from tokenmill.errors import ModelLoadError
    from tokenmill.loader.gguf_tensors import GGUFTensors

    tensors = GGUFTensors.__new__(GGUFTensors)
    tensors.arch = "llama"
    assert tensors.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert tensors.hf_name("blk.0.ffn_gate_exps.weight") == "model.layers.0.mlp.experts.gate_exps"
    with pytest.raises(ModelLoadError, match="blk.0.ssm_conv1d.weight"):
        tensors.hf_name("blk.0.ssm_conv1d.weight")
