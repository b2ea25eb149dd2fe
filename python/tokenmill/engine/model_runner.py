"""Loads the model, owns the paged KV cache and runs one step's forward."""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from tokenmill import distributed
from tokenmill.config import EngineArgs
from tokenmill.distributed import StepInputs
from tokenmill.engine.decode_graphs import DecodeGraphs
from tokenmill.engine.sampler import argmax_rows
from tokenmill.errors import KVCacheTooSmallError, ModelLoadError
from tokenmill.host_memory import move_to_huge_pages
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.greedy_head import GreedyHead
from tokenmill.layers.linear import Linear, linear, pack_weights
from tokenmill.loader.hf import iterate_weights
from tokenmill.models import model_class

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        dtype = torch.bfloat16  # float16 matmul is slow on most CPUs
    return dtype


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


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    def __init__(
        self, args: EngineArgs, hf_config, model_path: str, device: torch.device, max_model_len: int
    ):
        self.args = args
        self.device = device
        self.config = hf_config
        self.dtype = resolve_dtype(args.dtype, hf_config, device)
        self.max_model_len = max_model_len
        self.model = self._load_model(model_path)
        self._pinned: dict[str, torch.Tensor] = {}
        self.graphs = None
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache(self.num_blocks)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s)",
            self.num_blocks,
            args.block_size,
            self.num_blocks * args.block_size,
            self.kv_cache.numel() * self.dtype.itemsize / 2**20,
            self.dtype,
        )
        if self._use_graphs():
            # On CPUs the Python a graph saves is a fixed cost per step, which
            # matters most for small batches; larger ones would only hold more buffers.
            top = args.max_graph_batch if device.type == "cuda" else min(args.max_graph_batch, 8)
            graphs = DecodeGraphs(
                self.model,
                device,
                min(top, args.max_num_seqs),
                -(-max_model_len // args.block_size),
                every_size=device.type == "cpu",
            )
            self.graphs = graphs if graphs.graphs else None
        self.argmax_weight = self._argmax_weight()
        self.greedy_head = self._greedy_head()

    def _argmax_weight(self) -> torch.Tensor | None:
        """The LM head weight where greedy steps may take their tokens from it
        directly (on a CPU, on one rank): logits in the model's dtype, then a
        native row-wise argmax, with no float32 copy of them."""
        weight = getattr(self.model, "logits_weight", None)
        if (
            self.device.type != "cpu"
            or distributed.tp().world > 1
            or weight is None
            or weight.dtype not in (torch.bfloat16, torch.float32)
        ):
            return None
        return weight

    def _greedy_head(self) -> GreedyHead | None:
        """On CPUs, where the LM head is a large share of a step's weight reads
        (an eighth or more), single-sequence greedy steps read it through its
        int8 copy; the copy costs a quarter (bfloat16 heads: half) of its size."""
        weight = self.argmax_weight
        if weight is None:
            return None
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if weight.numel() * weight.element_size() * 8 < total:
            return None
        return GreedyHead(weight)

    def _use_graphs(self) -> bool:
        if self.args.enforce_eager:
            return False
        # Collectives are not recorded operator calls.
        return self.device.type == "cuda" or (
            self.device.type == "cpu" and distributed.tp().world == 1
        )

    def _load_model(self, path: str):
        cls = model_class(self.config)
        max_positions = max(
            self.max_model_len, getattr(self.config, "max_position_embeddings", 0) or 0
        )
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with _skip_weight_init(), self.device:
                model = cls(self.config, max_positions)
        finally:
            torch.set_default_dtype(previous)
        for layer in model.modules():  # rotary tables stay float32
            for name, buf in list(layer.named_buffers(recurse=False)):
                if name == "cos_sin_cache":
                    layer.cos_sin_cache = buf.float()
        loaded = model.load_weights(iterate_weights(path))
        missing = set(dict(model.named_parameters())) - loaded
        if missing:
            raise ModelLoadError(f"checkpoint lacks weights: {sorted(missing)[:8]}")
        if self.device.type == "cpu":
            move_to_huge_pages(model)
            weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
            pack_weights([*weights, getattr(model, "logits_weight", None)])
        return model.eval()

    @property
    def kv_bytes_per_block(self) -> int:
        layers = self.model.attention_layers
        a = layers[0]
        return (
            len(layers)
            * 2
            * a.num_kv_heads
            * self.args.block_size
            * a.head_size
            * self.dtype.itemsize
        )

    def _gpu_kv_budget(self) -> int:
        """gpu_memory_utilization of the GPU, less what the weights, a full step's
        activations (measured with a dummy forward) and other processes take."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward()
        free, total = torch.cuda.mem_get_info()
        others = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_allocated()
        budget = int(total * self.args.gpu_memory_utilization) - others - peak
        if budget <= 0:
            raise KVCacheTooSmallError(
                f"no GPU memory left for the KV cache: weights and activations take "
                f"{peak / 2**30:.2f} GiB and other processes {others / 2**30:.2f} GiB of the "
                f"{self.args.gpu_memory_utilization:.0%} of {total / 2**30:.1f} GiB allowed; "
                "raise gpu_memory_utilization, lower max_num_batched_tokens or use a smaller model"
            )
        return budget

    @torch.inference_mode()
    def _profile_forward(self) -> None:
        """One forward of a full token budget through a throwaway one-sequence cache."""
        tokens = min(self.args.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // self.args.block_size)
        self._allocate_kv_cache(blocks)
        step = StepInputs(
            input_ids=np.zeros(tokens, dtype=np.int32),
            positions=np.arange(tokens, dtype=np.int32),
            slot_mapping=np.arange(tokens, dtype=np.int32),
            seq_lens=np.array([tokens], dtype=np.int32),
            query_start_loc=np.array([0, tokens], dtype=np.int32),
            block_tables=np.arange(blocks, dtype=np.int32)[None],
            copies=np.zeros((0, 2), dtype=np.int32),
            rows=np.arange(min(tokens, self.args.max_num_seqs), dtype=np.int32),
        )
        self.execute_step(step)
        torch.cuda.synchronize()
        del self.kv_cache
        for layer in self.model.attention_layers:
            layer.key_cache = layer.value_cache = None
        torch.cuda.empty_cache()

    def _num_kv_blocks(self) -> int:
        budget = self.args.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                budget = self._gpu_kv_budget()
            else:
                budget = min(4 << 30, available_memory_bytes() // 2)
        elif budget < 1:
            free = (
                torch.cuda.mem_get_info()[0]
                if self.device.type == "cuda"
                else available_memory_bytes()
            )
            budget = int(free * budget)
        per_block = self.kv_bytes_per_block
        blocks = int(budget // per_block)
        needed = -(-self.max_model_len // self.args.block_size)
        if blocks < needed:
            raise KVCacheTooSmallError(
                f"KV cache of {budget / 2**20:.1f} MiB holds {blocks} blocks, but one sequence of "
                f"max_model_len={self.max_model_len} needs {needed} blocks ({needed * per_block / 2**20:.1f} MiB); "
                "raise kv_cache_memory or lower max_model_len"
            )
        return blocks

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        layers = self.model.attention_layers
        a = layers[0]
        shape = (len(layers), 2, num_blocks, a.num_kv_heads, self.args.block_size, a.head_size)
        # Committed at start-up (zeroed), so that an overcommitted host fails
        # here rather than mid-request and no step pays for first-touch page
        # faults. On CPUs not on huge pages: their first touch (direct
        # compaction) cost 0.7-1.6 s per GiB against 0.43 s for plain pages,
        # while decode attention, which reads scattered blocks, ran no faster on them.
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.key_cache, layer.value_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _tensor(self, array: np.ndarray, name: str) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cpu":
            return t
        if self.device.type != "cuda":
            return t.to(self.device)
        # Staged through page-locked memory so the copy runs asynchronously; a
        # buffer is reused only after the previous step synchronised on its logits.
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            buf = torch.empty(max(t.numel(), 4096), dtype=t.dtype, pin_memory=True)
            self._pinned[name] = buf
        staged = buf[: t.numel()].view(t.shape)
        staged.copy_(t)
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(
        self, out, logit_rows: np.ndarray, greedy: bool = False
    ) -> tuple[torch.Tensor | None, np.ndarray | None]:
        """Runs the forward for a scheduler output. Returns float32 logits at
        `logit_rows` and None; or, when the caller wants only each row's argmax
        (greedy) and this runner can give it (on CPUs: the greedy head for one
        row, a native argmax of the logits in the model's dtype for more), None
        and those int32 tokens."""
        step = StepInputs.from_output(out, logit_rows)
        if distributed.tp().world > 1:
            distributed.broadcast_step(step)
        hidden = self.hidden_states(step)
        if greedy and self.greedy_head is not None and len(hidden) == 1:
            token = self.greedy_head(hidden)
            if token is not None:
                return None, np.array([token], dtype=np.int32)
        if greedy and self.argmax_weight is not None:
            # compute_logits is this linear cast to float32, which keeps the order.
            tokens = argmax_rows(linear(hidden, self.argmax_weight))
            return None, tokens.numpy().astype(np.int32)
        return self.model.compute_logits(hidden), None

    @torch.inference_mode()
    def execute_step(self, step: StepInputs) -> torch.Tensor:
        """Float32 logits at the step's logit rows."""
        return self.model.compute_logits(self.hidden_states(step))

    def hidden_states(self, step: StepInputs) -> torch.Tensor:
        """The forward's final hidden states at the step's logit rows."""
        self.copy_blocks(step.block_copies)
        if self.graphs is not None and self.graphs.can_run(step):
            hidden = self.graphs.run(step)
        else:
            meta = AttentionMetadata(
                slot_mapping=self._tensor(step.slot_mapping, "slot_mapping"),
                block_tables=self._tensor(step.block_tables, "block_tables"),
                seq_lens=self._tensor(step.seq_lens, "seq_lens"),
                query_start_loc=self._tensor(step.query_start_loc, "query_start_loc"),
            )
            hidden = self.model(
                self._tensor(step.input_ids, "input_ids"),
                self._tensor(step.positions, "positions"),
                meta,
            )
        if not _all_rows(step.rows, len(hidden)):
            hidden = hidden[self._tensor(step.rows, "rows").long()]
        return hidden


def _all_rows(rows: np.ndarray, n: int) -> bool:
    """Whether rows is 0..n-1, as in a decode step: then no gather is needed."""
    return len(rows) == n and bool((rows == np.arange(n)).all())
