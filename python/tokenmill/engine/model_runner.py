"""ModelRunner: everything between the scheduler's plan and the sampled
tokens: inputs, graphs, forward, logits processing, sampling."""

from __future__ import annotations

import logging

import numpy as np
import torch

from tokenmill import distributed
from tokenmill.config import EngineArgs
from tokenmill.cpu_policy import (
    MAX_CPU_GRAPH_BATCH,
    available_memory_bytes,
    default_cpu_kv_budget,
    greedy_head_pays,
)
from tokenmill.engine.batch import RunnerOutput, SamplingBatch, StepInputs
from tokenmill.engine.decode_graphs import DecodeGraphs
from tokenmill.engine.sampler import Sampler, argmax_rows
from tokenmill.errors import KVCacheTooSmallError
from tokenmill.host_memory import commit_in_background, huge_page_empty
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.greedy_head import GreedyHead
from tokenmill.layers.linear import linear
from tokenmill.outputs import Logprob

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs a loaded model over the paged KV cache it owns. On rank 0 of a
    tensor-parallel group it broadcasts each step to the other ranks' runners."""

    def __init__(
        self,
        args: EngineArgs,
        model: torch.nn.Module,
        device: torch.device,
        max_model_len: int,
        workers: distributed.WorkerGroup | None = None,
        defer_graphs: bool = False,
        num_blocks: int | None = None,
        kv_extra_bytes_per_block: int = 0,
    ):
        """num_blocks: the KV cache's size in blocks, else sized from the memory
        budget, where each block also costs kv_extra_bytes_per_block (a draft
        model's cache over the same blocks)."""
        self.args = args
        self.defer_start_up = defer_graphs
        self._commit_pending = False
        self.device = device
        self.model = model
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.max_model_len = max_model_len
        self.workers = workers
        self.sampler = Sampler(args.seed)
        self._pinned: dict[str, torch.Tensor] = {}
        self.graphs = None
        self.num_blocks = num_blocks or self._num_kv_blocks(kv_extra_bytes_per_block)
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
            top = args.max_graph_batch
            if device.type == "cpu":
                top = min(top, MAX_CPU_GRAPH_BATCH)
            graphs = DecodeGraphs(
                self.model,
                device,
                min(top, args.max_num_seqs),
                -(-max_model_len // args.block_size),
                every_size=device.type == "cpu",
                defer=defer_graphs and workers is None,
            )
            self.graphs = graphs if graphs.graphs or graphs.pending else None
        self.argmax_weight = self._argmax_weight()
        self.greedy_head = self._greedy_head()

    @property
    def graph_tokens(self) -> int:
        """The most tokens a decode graph runs (0: no graphs)."""
        return self.graphs.max_batch if self.graphs is not None else 0

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
        return GreedyHead(weight) if greedy_head_pays(weight, total) else None

    def _use_graphs(self) -> bool:
        if self.args.enforce_eager:
            return False
        # Collectives are not recorded operator calls.
        return self.device.type == "cuda" or (
            self.device.type == "cpu" and distributed.tp().world == 1
        )

    @property
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model, self.args.block_size)

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
        self.logits(step)
        torch.cuda.synchronize()
        del self.kv_cache
        for layer in self.model.attention_layers:
            layer.key_cache = layer.value_cache = None
        torch.cuda.empty_cache()

    def _num_kv_blocks(self, extra_bytes_per_block: int = 0) -> int:
        budget = self.args.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                budget = self._gpu_kv_budget()
            else:
                budget = default_cpu_kv_budget()
        elif budget < 1:
            free = (
                torch.cuda.mem_get_info()[0]
                if self.device.type == "cuda"
                else available_memory_bytes()
            )
            budget = int(free * budget)
        per_block = self.kv_bytes_per_block + extra_bytes_per_block
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
        if self.device.type == "cpu":
            # Anonymous memory, zero as the OS hands it out, committed by a
            # thread: no zeroing pass holds up start-up (1 s for the default
            # 4 GiB), and RSS does not creep up under load as blocks are first
            # used. Not on huge pages: their first touch (direct compaction)
            # cost 0.7-1.6 s per GiB, and decode attention, which reads
            # scattered blocks, ran no faster on them.
            self.kv_cache = huge_page_empty(shape, self.dtype, huge=False)
            self._commit_pending = True
            if not self.defer_start_up:
                self.finish_start_up_step()
        else:
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
    def execute(self, plan, batch: SamplingBatch) -> RunnerOutput:
        """Runs the forward for a scheduler plan and takes from its logits
        what the batch asks: a token per slot, logprob rows, prompt logprobs."""
        if self.workers is not None:
            self.workers.check()
        step = StepInputs.from_plan(plan, batch.rows)
        if distributed.tp().world > 1:
            distributed.broadcast_step(step)
        self.sampler.prepare(batch.slots)
        hidden = self.hidden_states(step)
        if self._argmax_only(batch):
            tokens = self.argmax_tokens(hidden)
            if tokens is not None:
                return RunnerOutput(tokens)
        logits = self.model.compute_logits(hidden)
        num_sample_rows = len(batch.sample_rows)
        output = RunnerOutput(np.zeros(0, np.int32))
        if batch.prompt_targets:
            output.prompt_logprobs = prompt_logprobs(logits[num_sample_rows:], batch.prompt_targets)
            logits = logits[:num_sample_rows]
        if batch.logprob_rows:
            picked = logits[torch.tensor(batch.logprob_rows, device=logits.device)]
            output.row_logprobs = picked.float().log_softmax(-1).cpu()
        if batch.slots:
            rows = [s.row for s in batch.slots]
            if rows != list(range(len(logits))):
                logits = logits[torch.tensor(rows, device=logits.device)]
            sampled = self.sampler(logits, batch.slots)
            output.tokens = sampled.token_ids.cpu().numpy()
            output.sampled_logprobs, output.top_logprobs = (
                sampled.sampled_logprobs,
                sampled.top_logprobs,
            )
        return output

    def _argmax_only(self, batch: SamplingBatch) -> bool:
        """Whether each sample row's token is its plain argmax, one per row."""
        return (
            not batch.prompt_targets
            and not batch.logprob_rows
            and len(batch.slots) == len(batch.sample_rows)
            and all(self.sampler.picks_argmax(s) for s in batch.slots)
        )

    def argmax_tokens(self, hidden: torch.Tensor) -> np.ndarray | None:
        """Greedy tokens without float32 logits where this runner can: on
        CPUs, the greedy head for one row, or a native argmax of the logits in
        the model's dtype; else None."""
        if self.greedy_head is not None and len(hidden) == 1:
            token = self.greedy_head(hidden)
            if token is not None:
                return np.array([token], dtype=np.int32)
        if self.argmax_weight is not None:
            # compute_logits is this linear cast to float32, which keeps the order.
            return argmax_rows(linear(hidden, self.argmax_weight)).numpy().astype(np.int32)
        return None

    @torch.inference_mode()
    def logits(self, step: StepInputs) -> torch.Tensor:
        """Float32 logits at the step's logit rows (tensor-parallel workers run
        this; their logits are gathered on every rank)."""
        return self.model.compute_logits(self.hidden_states(step))

    def finish_start_up_step(self) -> bool:
        """One piece of the start-up left for later (defer_graphs): committing
        the KV cache, then a decode graph per call; whether any remains. The
        server calls it while idle, after it answers /health."""
        if self._commit_pending:
            self._commit_pending = False
            commit_in_background(self.kv_cache)
            return True
        if self.graphs is None or not self.graphs.capture_next():
            if self.graphs is not None and not self.graphs.graphs and not self.graphs.pending:
                self.graphs = None  # capture failed: plain forwards
            return False
        return True

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

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
                num_decode_seqs=step.num_decode_seqs,
            )
            hidden = self.model(
                self._tensor(step.input_ids, "input_ids"),
                self._tensor(step.positions, "positions"),
                meta,
            )
        if not _all_rows(step.rows, len(hidden)):
            hidden = hidden[self._tensor(step.rows, "rows").long()]
        return hidden


def kv_bytes_per_block(model: torch.nn.Module, block_size: int) -> int:
    """Bytes of a model's keys and values for one block of tokens."""
    layers = model.attention_layers
    a = layers[0]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return len(layers) * 2 * a.num_kv_heads * block_size * a.head_size * dtype.itemsize


def _all_rows(rows: np.ndarray, n: int) -> bool:
    """Whether rows is 0..n-1, as in a decode step: then no gather is needed."""
    return len(rows) == n and bool((rows == np.arange(n)).all())


def prompt_logprobs(logits: torch.Tensor, targets) -> list[list[dict[int, Logprob]]]:
    """Per target, per prompt position: the logprob and rank of the next
    prompt token, and the top-k."""
    logprobs = logits.float().log_softmax(-1)
    found, row = [], 0
    for target in targets:
        lp = logprobs[row : row + len(target.rows)]
        row += len(target.rows)
        next_tokens = torch.tensor(target.next_tokens, device=lp.device)
        chosen = lp.gather(1, next_tokens[:, None]).squeeze(1)
        ranks = (lp > chosen[:, None]).sum(-1) + 1
        k = target.k
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (None, None)
        entries = []
        for j, (t, c, r) in enumerate(
            zip(target.next_tokens, chosen.tolist(), ranks.tolist(), strict=True)
        ):
            entry = {t: Logprob(c, r)}
            for n in range(k):
                entry.setdefault(int(top_ids[j, n]), Logprob(float(top_vals[j, n]), n + 1))
            entries.append(entry)
        found.append(entries)
    return found
