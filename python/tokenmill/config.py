"""Engine arguments: defined once, shared by LLM(...), the CLI and the server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field

from tokenmill.errors import InvalidParameterError


def parse_memory(value) -> float | int | None:
    """'4GiB', '512MB', 2e9 -> bytes; a number below 1 is a fraction of free memory."""
    if value is None or isinstance(value, (int, float)):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise InvalidParameterError(
            "kv_cache_memory", f"kv_cache_memory: cannot parse {value!r} (try 4GiB or 0.5)"
        )
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not unit:
        return number if number < 1 else int(number)
    base = 1024 if binary else 1000
    return int(number * base ** "KMGT".index(unit) * base)


SPECULATIVE_METHODS = ("ngram", "suffix", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, in the keys of vLLM's speculative_config."""

    method: str = "ngram"
    num_speculative_tokens: int = 5  # most draft tokens per sequence and step
    prompt_lookup_max: int = 4  # ngram: the longest tail matched
    prompt_lookup_min: int = 2  # ngram: the shortest
    # suffix: a tree of recent requests' outputs (and the request's own text
    # by prompt lookup); drafts follow the longest tail it holds
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 1000
    suffix_decoding_max_spec_factor: float = 1.0  # draft at most this x the matched tail
    suffix_decoding_min_token_prob: float = 0.1
    # draft_model: a smaller model with the target's tokenizer (id, folder or .gguf)
    model: str | None = None

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """From a dict or its JSON text (None, empty or "off": no speculation;
        "auto": the device's default, chosen by the engine)."""
        if value is None or value in ("", "off", "auto") or isinstance(value, cls):
            return value if isinstance(value, cls) else None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameterError(
                    "speculative_config", f"speculative_config is not JSON: {e}"
                ) from None
        if not isinstance(value, dict):
            raise InvalidParameterError(
                "speculative_config", "speculative_config must be an object"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise InvalidParameterError(
                "speculative_config",
                f"speculative_config: unsupported keys {unknown} (tokenmill takes {sorted(names)})",
            )
        if "model" in value and "method" not in value:
            value = {**value, "method": "draft_model"}  # as vLLM infers it
        config = cls(**value)
        if config.method not in SPECULATIVE_METHODS:
            raise InvalidParameterError(
                "speculative_config",
                f"speculative_config: method {config.method!r} is not available "
                f"(tokenmill offers {', '.join(SPECULATIVE_METHODS)})",
            )
        if (config.method == "draft_model") != (config.model is not None):
            raise InvalidParameterError(
                "speculative_config",
                "speculative_config: method draft_model takes a model (the draft's), and only it",
            )
        ints = (
            config.num_speculative_tokens,
            config.prompt_lookup_min,
            config.prompt_lookup_max,
            config.suffix_decoding_max_tree_depth,
            config.suffix_decoding_max_cached_requests,
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise InvalidParameterError(
                "speculative_config", "speculative_config: token counts must be integers"
            )
        if not 1 <= config.num_speculative_tokens <= 16:
            raise InvalidParameterError(
                "speculative_config", "num_speculative_tokens must be in [1, 16]"
            )
        if (
            min(config.suffix_decoding_max_tree_depth, config.suffix_decoding_max_cached_requests)
            < 1
        ):
            raise InvalidParameterError(
                "speculative_config",
                "suffix_decoding_max_tree_depth and suffix_decoding_max_cached_requests must be "
                "at least 1",
            )
        if not (
            config.suffix_decoding_max_spec_factor > 0
            and 0 <= config.suffix_decoding_min_token_prob <= 1
        ):
            raise InvalidParameterError(
                "speculative_config",
                "suffix_decoding_max_spec_factor must be positive and "
                "suffix_decoding_min_token_prob in [0, 1]",
            )
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise InvalidParameterError(
                "speculative_config",
                "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max",
            )
        return config


def _arg(help: str, metadata_aliases: tuple[str, ...] = (), **kw):
    return field(metadata={"help": help, "aliases": metadata_aliases}, **kw)


@dataclass
class EngineArgs:
    model: str | None = _arg(
        "Hugging Face model id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)",
        default=None,
    )
    tokenizer: str | None = _arg("tokenizer id or folder, if not the model's", default=None)
    revision: str | None = _arg("model revision on the hub", default=None)
    dtype: str = _arg(
        "auto, float32, bfloat16 or float16 (for GGUF files: of the activations and unquantized tensors)",
        default="auto",
    )
    gguf_blocks: bool = _arg(
        "run a GGUF file's quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) "
        "from their blocks with integer products: the file's memory and the fastest single "
        "stream; --no-gguf-blocks dequantizes every tensor to dtype at load (3-4x the memory)",
        default=True,
    )
    gguf_activation_bits: int = _arg(
        "activations of a GGUF file's integer products: 8 (as llama.cpp; the fastest) or 14 "
        "(next-token distributions within float rounding of the dequantized weights' at the same "
        "decode speed, prefill about 1.5x slower); the logits always take 14",
        default=8,
    )
    device: str = _arg("auto, cpu, cuda or xpu", default="auto")
    max_model_len: int | None = _arg("context length (default: the model's)", default=None)
    max_num_seqs: int = _arg("most sequences in one step", default=256)
    max_num_batched_tokens: int = _arg("token budget of one step", default=2048)
    block_size: int = _arg("tokens per KV-cache block", default=16)
    kv_cache_memory: str | None = _arg(
        "KV-cache size in bytes (e.g. 4GiB) or a fraction of free memory", default=None
    )
    gpu_memory_utilization: float = _arg("fraction of GPU memory tokenmill may use", default=0.9)
    enforce_eager: bool = _arg(
        "never replay captured graphs (CUDA graphs, or recorded operator calls on CPUs) for decode steps",
        default=False,
    )
    max_graph_batch: int = _arg(
        "largest decode batch captured as a graph (at most 8 on CPUs)", default=256
    )
    enable_prefix_caching: bool = _arg("reuse KV blocks across requests by content", default=True)
    enable_chunked_prefill: bool = _arg("split long prompts across steps", default=True)
    max_itl_ms: float | None = _arg(
        "step-time target while sequences decode: prefill chunks join a step only as far as a "
        "cost model fitted to measured steps predicts they fit (0: the token budget alone; "
        "default 250)",
        default=None,
    )
    speculative_config: str | dict | None = _arg(
        'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 5, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}, or "method": "suffix" (recent '
        'outputs as well, suffix_decoding_* keys as in vLLM), or "method": "draft_model" with '
        '"model" (a smaller model with the same tokenizer); greedy output is unchanged and '
        "sampled output keeps its distribution; auto (the default): n-gram drafts on CPUs, where "
        "they are measured level or faster at every batch size, none on GPUs; off: none",
        default="auto",
    )
    scheduling_policy: str = _arg("fcfs or priority", default="fcfs")
    seed: int = _arg("seed of unseeded sampling", default=0)
    tensor_parallel_size: int = _arg(
        "devices to shard the model over", default=1, metadata_aliases=("-tp",)
    )
    trust_remote_code: bool = _arg("allow custom code from the hub", default=False)
    chat_template: str | None = _arg("Jinja chat template file or string", default=None)
    max_logprobs: int = _arg("most logprobs a request may ask for", default=20)
    quantization: str | None = _arg(
        "the checkpoint's quantization (gptq, awq, gguf), checked against it "
        "(default: whatever it holds)",
        default=None,
    )
    generation_config: str = _arg(
        "auto: the model's generation_config.json gives default sampling parameters "
        "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) that a request "
        "overrides; vllm: tokenmill's own defaults",
        default="auto",
    )

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidParameterError(
                "dtype", f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise InvalidParameterError(
                "scheduling_policy", "scheduling_policy must be fcfs or priority"
            )
        if self.gguf_activation_bits not in (8, 14):
            raise InvalidParameterError(
                "gguf_activation_bits", "gguf_activation_bits must be 8 or 14"
            )
        if self.block_size not in (16, 32):
            raise InvalidParameterError("block_size", "block_size must be 16 or 32")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidParameterError(
                "gpu_memory_utilization", "gpu_memory_utilization must be in (0, 1]"
            )
        if self.generation_config not in ("auto", "vllm"):
            raise InvalidParameterError(
                "generation_config", "generation_config must be auto or vllm"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, f"{name} must be at least 1")
        self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        if self.speculative_config != "auto":
            self.speculative_config = self.speculative  # checked now, and parsed once

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip=("model",)) -> None:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flags = ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]]
            if f.type in ("bool", bool):
                parser.add_argument(
                    *flags,
                    action=argparse.BooleanOptionalAction,
                    default=f.default,
                    help=f.metadata["help"],
                )
            else:
                kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
                    str(f.type), str
                )
                parser.add_argument(*flags, type=kind, default=f.default, help=f.metadata["help"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
