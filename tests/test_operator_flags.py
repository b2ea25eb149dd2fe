"""What operators moving from vLLM pass: the model's generation config as
default sampling parameters, --quantization checked against the checkpoint,
and vLLM's flags and environment for the server."""

import json
import shutil

import httpx
import pytest
from tokenmill import LLM
from tokenmill.cli import build_parser
from tokenmill.errors import InvalidParameterError

from tests.server_utils import ServerProcess


@pytest.fixture(scope="module")
def configured_model(tiny_model, tmp_path_factory):
    """The tiny llama with a generation config that caps outputs at 5 tokens."""
    path = tmp_path_factory.mktemp("generation_config") / "model"
    shutil.copytree(tiny_model("llama"), path)
    config = {"max_new_tokens": 5, "temperature": 0.0, "top_k": 7, "repetition_penalty": 1.1}
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def test_generation_config_gives_defaults_a_request_overrides(configured_model):
    llm = LLM(configured_model, dtype="float32", kv_cache_memory="16MiB", max_model_len=128)
    defaults = llm.get_default_sampling_params()
    assert (defaults.max_tokens, defaults.temperature, defaults.top_k) == (5, 0.0, 7)
    assert defaults.repetition_penalty == 1.1
    [out] = llm.generate(["The quick"], use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5
    plain = LLM(
        configured_model,
        dtype="float32",
        kv_cache_memory="16MiB",
        max_model_len=128,
        generation_config="vllm",
    )
    assert plain.get_default_sampling_params().max_tokens == 16
    with pytest.raises(InvalidParameterError) as e:
        LLM(configured_model, generation_config="hf")
    assert e.value.param == "generation_config"


def test_quantization_is_checked_against_the_checkpoint(tiny_model):
    with pytest.raises(InvalidParameterError, match="not quantized") as e:
        LLM(tiny_model("llama"), quantization="gptq", kv_cache_memory="16MiB")
    assert e.value.param == "quantization"


def test_vllm_flags_parse(monkeypatch):
    args = build_parser().parse_args(
        ["serve", "--model", "m", "-tp", "2", "--served-model-name", "a", "b"]
        + ["--allowed-origins", '["https://x.org"]', "--disable-log-requests"]
        + ["--uvicorn-log-level", "info", "--max-logprobs", "5"]
    )
    assert (args.model_flag, args.tensor_parallel_size, args.served_model_name) == (
        "m",
        2,
        ["a", "b"],
    )
    assert args.allowed_origins == ["https://x.org"] and args.disable_log_requests
    assert args.max_logprobs == 5
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "k")
    assert build_parser().parse_args(["serve"]).api_key == "k"


@pytest.mark.slow
def test_server_applies_the_generation_config_aliases_and_cors(configured_model):
    server = ServerProcess(
        configured_model,
        *("--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "128"),
        *("--served-model-name", "tiny", "tiny-alias", "--allowed-origins", '["https://a.org"]'),
    )
    try:
        names = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        assert names == ["tiny", "tiny-alias"]
        body = {"model": "tiny-alias", "messages": [{"role": "user", "content": "hi"}]}
        out = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()
        assert out["usage"]["completion_tokens"] == 5 and out["model"] == "tiny"
        body["max_tokens"] = 9  # the request wins
        out = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()
        assert out["usage"]["completion_tokens"] == 9
        preflight = httpx.options(
            f"{server.url}/v1/chat/completions",
            headers={"Origin": "https://a.org", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://a.org"
    finally:
        assert server.stop() == 0
