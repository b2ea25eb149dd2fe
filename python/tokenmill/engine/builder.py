"""Start-up: resolve the model, load its weights, size the KV cache, build
the runner (every rank) and the scheduler and tokenizer (rank 0)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from tokenmill import _core, distributed
from tokenmill.config import EngineArgs, SpeculativeConfig
from tokenmill.devices import resolve_device
from tokenmill.engine.draft_model import DraftModelProposer
from tokenmill.engine.model_runner import ModelRunner, kv_bytes_per_block
from tokenmill.errors import InvalidParameterError, ModelLoadError
from tokenmill.host_memory import move_to_huge_pages
from tokenmill.layers.linear import Linear, pack_weights
from tokenmill.layers.moe import FusedMoE
from tokenmill.loader.config import ModelConfig, load_config
from tokenmill.loader.gguf import gguf_metadata
from tokenmill.loader.gguf_tensors import GGUFTensors
from tokenmill.loader.hf import iterate_weights, resolve_model_path
from tokenmill.models import model_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """What start-up resolves about a model before building anything."""

    path: str  # a Hugging Face folder (for GGUF files: their config and tokenizer)
    hf_config: ModelConfig
    max_model_len: int
    device: torch.device
    gguf_file: str | None = None  # the weights, where they are a GGUF file's


def resolve_model(args: EngineArgs) -> ModelSpec:
    path = resolve_model_path(args.model, args.revision)
    gguf_file = None
    if path.endswith(".gguf"):
        gguf_file, path = path, gguf_metadata(path)
    config = load_config(path)
    _check_quantization(args.quantization, config, gguf_file)
    if gguf_file:
        # No dtype of its own: bfloat16, 1.7-2.2x float32's decode speed on CPUs
        # with or without bf16 instructions (bench/latency.py).
        config.dtype = "bfloat16"
    if gguf_file and args.gguf_blocks:
        config.quantization_config = {
            "quant_method": "gguf",
            "activation_bits": args.gguf_activation_bits,
        }
    device = resolve_device(args.device)
    return ModelSpec(path, config, _max_model_len(args, config), device, gguf_file)


def _check_quantization(asked: str | None, config, gguf_file: str | None) -> None:
    held = (
        "gguf"
        if gguf_file
        else (getattr(config, "quantization_config", None) or {}).get("quant_method")
    )
    if asked is not None and asked.lower() != (held or "").lower():
        raise InvalidParameterError(
            "quantization",
            f"quantization={asked!r}, but the checkpoint is {held or 'not quantized'}",
        )


def _max_model_len(args: EngineArgs, cfg) -> int:
    model_max = (
        getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    )
    if args.max_model_len is None:
        return model_max
    if args.max_model_len > model_max:
        raise InvalidParameterError(
            "max_model_len",
            f"max_model_len {args.max_model_len} exceeds the model's context of {model_max} tokens",
        )
    return args.max_model_len


def build_runner(
    args: EngineArgs,
    spec: ModelSpec,
    rank: int = 0,
    init_method: str | None = None,
    defer_graphs: bool = False,
    draft: DraftModel | None = None,
) -> ModelRunner:
    """Joins the tensor-parallel group (if any), loads this rank's shard of
    the model and allocates its KV cache (sharing the budget with a draft
    model's); it captures decode graphs, or leaves them for later (defer_graphs)."""
    torch.manual_seed(args.seed)
    workers = None
    if args.tensor_parallel_size > 1:
        workers = distributed.start(args, spec.hf_config, spec.device, rank, init_method)
    model = load_model(spec, resolve_dtype(args.dtype, spec.hf_config, spec.device))
    extra = draft.kv_bytes_per_block if draft is not None else 0
    return ModelRunner(
        args, model, spec.device, spec.max_model_len, workers, defer_graphs, None, extra
    )


@dataclass
class DraftModel:
    """A draft model for speculation, loaded before the target's KV cache is sized."""

    args: EngineArgs
    model: torch.nn.Module

    @property
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model, self.args.block_size)


def load_draft_model(args: EngineArgs, spec: ModelSpec) -> DraftModel | None:
    """The draft model speculative_config names, checked against the target."""
    speculative = args.speculative
    if speculative is None or speculative.method != "draft_model":
        return None
    if args.tensor_parallel_size > 1:
        raise InvalidParameterError(
            "speculative_config", "a draft model runs on one device: tensor_parallel_size 1 only"
        )
    draft_args = dataclasses.replace(
        args, model=speculative.model, tokenizer=None, revision=None, quantization=None
    )
    draft = resolve_model(dataclasses.replace(draft_args, max_model_len=None))
    if draft.hf_config.vocab_size != spec.hf_config.vocab_size:
        raise InvalidParameterError(
            "speculative_config",
            f"the draft model's vocabulary ({draft.hf_config.vocab_size} tokens) is not the "
            f"target's ({spec.hf_config.vocab_size}): it must share the tokenizer",
        )
    if draft.max_model_len < spec.max_model_len:
        raise InvalidParameterError(
            "speculative_config",
            f"the draft model's context ({draft.max_model_len}) is shorter than max_model_len "
            f"({spec.max_model_len}); lower max_model_len",
        )
    draft.max_model_len = spec.max_model_len
    model = load_model(draft, resolve_dtype(args.dtype, draft.hf_config, draft.device))
    return DraftModel(draft_args, model)


def build_drafter(draft: DraftModel | None, target: ModelRunner) -> DraftModelProposer | None:
    """The draft model's runner, over a KV cache of the target's blocks."""
    if draft is None:
        return None
    runner = ModelRunner(
        draft.args, draft.model, target.device, target.max_model_len, num_blocks=target.num_blocks
    )
    return DraftModelProposer(runner, draft.args.block_size)


# On two CPU cores a decode step of the default model takes 10-40 ms and a
# 2,048-token prefill chunk over a second. Measured with bench/serve.py at
# 0.6 req/s (workload_main, prompts up to 512 tokens): a 150 ms target split
# prompts that fit one step anyway (TTFT p50 411 ms, ITL p99 148 ms), 250 ms
# gave TTFT p50 274 ms and ITL p99 108 ms, no target 266 / 34 ms; the target
# is there for long prompts, which it cuts from one 1.2 s stall into ~target steps.
DEFAULT_MAX_ITL_MS = 250.0


def build_scheduler(
    args: EngineArgs, spec: ModelSpec, num_blocks: int, graph_tokens: int = 0
) -> _core.Scheduler:
    """The core's scheduler; graph_tokens: the most tokens a decode graph runs (0: none)."""
    c = _core.SchedulerConfig()
    c.num_blocks = num_blocks
    c.block_size = args.block_size
    c.max_num_seqs = args.max_num_seqs
    c.max_num_batched_tokens = max(
        args.max_num_batched_tokens, 1 if args.enable_chunked_prefill else spec.max_model_len
    )
    c.max_model_len = spec.max_model_len
    c.enable_chunked_prefill = args.enable_chunked_prefill
    c.enable_prefix_caching = args.enable_prefix_caching
    c.priority_policy = args.scheduling_policy == "priority"
    c.max_step_ms = DEFAULT_MAX_ITL_MS if args.max_itl_ms is None else args.max_itl_ms
    speculative = args.speculative
    if args.speculative_config == "auto" and spec.device.type == "cpu":
        speculative = SpeculativeConfig()
    if speculative is not None:
        c.speculative.num_tokens = speculative.num_speculative_tokens
        c.speculative.min_ngram = speculative.prompt_lookup_min
        c.speculative.max_ngram = speculative.prompt_lookup_max
        # Drafts never push a decode step out of its graph: an eager step of a
        # small batch costs more than the drafts save (measured: 0.8x at batch 4).
        c.speculative.max_step_tokens = graph_tokens
        if speculative.method == "draft_model":
            c.speculative.method = _core.DraftMethod.MODEL
        elif speculative.method == "suffix":
            c.speculative.method = _core.DraftMethod.SUFFIX
            c.speculative.suffix_max_depth = speculative.suffix_decoding_max_tree_depth
            c.speculative.suffix_max_requests = speculative.suffix_decoding_max_cached_requests
            c.speculative.suffix_spec_factor = speculative.suffix_decoding_max_spec_factor
            c.speculative.suffix_min_token_prob = speculative.suffix_decoding_min_token_prob
    return _core.Scheduler(c)


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        dtype = torch.bfloat16  # float16 matmul is slow on most CPUs
    return dtype


def load_model(spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    """Builds the model on its device and loads the checkpoint into it; on
    CPUs, weights move to huge pages and gain their packed and coded forms."""
    config = spec.hf_config
    max_positions = spec.max_model_len  # no position reaches it
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _skip_weight_init(), spec.device:
            model = model_class(config)(config, max_positions)
    finally:
        torch.set_default_dtype(previous)
    for layer in model.modules():  # rotary tables stay float32
        for name, buf in list(layer.named_buffers(recurse=False)):
            if name == "cos_sin_cache":
                layer.cos_sin_cache = buf.float()
    blocks = (getattr(config, "quantization_config", None) or {}).get("quant_method") == "gguf"
    weights = (
        GGUFTensors(spec.gguf_file).iterate(config, blocks)
        if spec.gguf_file
        else iterate_weights(spec.path)
    )
    loaded = model.load_weights(weights)
    missing = set(dict(model.named_parameters())) - loaded
    if missing:
        raise ModelLoadError(f"checkpoint lacks weights: {sorted(missing)[:8]}")
    if spec.device.type == "cpu":
        move_to_huge_pages(model)
        weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
        pack_weights([*weights, getattr(model, "logits_weight", None)])
        for module in model.modules():
            if isinstance(module, FusedMoE):
                module.pack()
    return model.eval()


@contextlib.contextmanager
def _skip_weight_init():
    """Parameters are overwritten by the checkpoint, so random init is wasted work."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
