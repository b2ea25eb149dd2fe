"""Graphs for decode steps: CUDA graphs on GPUs, recorded operator calls on CPUs.

A decode step runs a few hundred small kernels whose launch cost (on a GPU)
or surrounding Python (on a CPU), not their work, bounds small batches. Each
batch size in `sizes` is captured once into a graph that reads its inputs
from static buffers; a step copies its inputs into those buffers, padded up
to the next captured size (padding tokens write to no cache slot), and
replays the graph. Attention reads each sequence's query tokens from
query_start_loc at run time, so a graph of n tokens also runs a decode step
of up to n tokens over fewer sequences: one that verifies draft tokens.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch

from tokenmill.engine.op_graph import GraphCaptureError, OpGraph
from tokenmill.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


class _CudaGraph:
    """A CUDA graph with OpGraph's interface: replay() returns the output."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn) -> torch.Tensor:
        fn()  # warm-up: lazy initialisation must not be captured
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.out = fn()
        return self.out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


def graph_batch_sizes(max_batch: int, every_size: bool = False) -> list[int]:
    """Batch sizes to capture, so that any batch up to max_batch pads to one.
    every_size where a padding row costs as much as a real one (CPUs compute
    it; a GPU's step time hardly moves from 3 rows to 4)."""
    if every_size:
        return list(range(1, max_batch + 1))
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Static input buffers plus one captured forward per batch size.

    With capture=False (devices without graphs, and tests) `run` executes the
    same padded forward eagerly, so the padding logic is exercised anywhere.
    With defer=True the graphs are captured one per `capture_next()` call (a
    server calls it while idle, after it is up); sizes not captured yet run
    eagerly meanwhile.
    """

    def __init__(
        self,
        model,
        device,
        max_batch: int,
        max_blocks: int,
        capture: bool = True,
        every_size: bool = False,
        defer: bool = False,
    ):
        self.model = model
        self.sizes = graph_batch_sizes(max_batch, every_size)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_batch, **i32)
        self.positions = torch.zeros(max_batch, **i32)
        self.slot_mapping = torch.full((max_batch,), -1, **i32)
        self.seq_lens = torch.ones(max_batch, **i32)
        self.query_start_loc = torch.arange(max_batch + 1, **i32)
        self.block_tables = torch.zeros(max_batch, max_blocks, **i32)
        # On CPUs the inputs are written through numpy views of the buffers: a
        # slice assignment costs far less than a tensor copy from Python.
        self._host = None
        if self.input_ids.device.type == "cpu":
            self._host = [t.numpy() for t in self._inputs()]
        self.graphs: dict[int, _CudaGraph | OpGraph] = {}
        # largest first, so smaller ones reuse its memory
        self._pending = list(reversed(self.sizes)) if capture else []
        self._capture_time = 0.0
        self._pool = None
        if capture and not defer:
            while self.capture_next():
                pass

    def _inputs(self) -> tuple[torch.Tensor, ...]:
        return (
            self.input_ids,
            self.positions,
            self.slot_mapping,
            self.seq_lens,
            self.block_tables,
            self.query_start_loc,
        )

    def _forward(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n],
            seq_lens=self.seq_lens[:n],
            query_start_loc=self.query_start_loc[: n + 1],
            num_decode_seqs=n,
        )
        return self.model(self.input_ids[:n], self.positions[:n], meta)

    def _reset_inputs(self) -> None:
        """One-token sequences over block 0 that write no cache slot: a capture
        (which runs its forward) after steps have run must neither write the
        last step's slots nor read its query layout, which a step with drafts
        leaves inconsistent with a batch of one-token sequences."""
        with torch.inference_mode():
            self.slot_mapping.fill_(-1)
            self.seq_lens.fill_(1)
            self.block_tables.zero_()
            self.query_start_loc.copy_(torch.arange(self.max_batch + 1, dtype=torch.int32))

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    @torch.inference_mode()
    def capture_next(self) -> bool:
        """Captures the next batch size's graph; whether any remain."""
        if not self._pending:
            return False
        t0 = time.monotonic()
        cuda = self.input_ids.device.type == "cuda"
        if cuda and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        n = self._pending.pop(0)
        self._reset_inputs()
        graph = _CudaGraph(self._pool) if cuda else OpGraph()
        try:
            graph.capture(functools.partial(self._forward, n))
        except GraphCaptureError as e:
            logger.info("decode steps run without graphs: %s", e)
            self.graphs.clear()
            self._pending.clear()
            return False
        self.graphs[n] = graph
        if cuda:
            torch.cuda.synchronize()
        self._capture_time += time.monotonic() - t0
        if not self._pending:
            logger.info(
                "captured %d %s graphs for decode batches up to %d in %.2f s",
                len(self.graphs),
                "CUDA" if cuda else "operator",
                self.max_batch,
                self._capture_time,
            )
        return bool(self._pending)

    def can_run(self, step) -> bool:
        n = len(step.input_ids)
        return (
            0 < n <= self.max_batch
            and step.num_decode_seqs == len(step.seq_lens)
            and step.block_tables.shape[1] <= self.max_blocks
        )

    @torch.inference_mode()
    def run(self, step) -> torch.Tensor:
        """Hidden states of a step of at most max_batch tokens."""
        n, b = len(step.input_ids), len(step.seq_lens)
        size = next(s for s in self.sizes if s >= n)
        width = step.block_tables.shape[1]
        ids, positions, slots, lens, tables, starts = self._host or self._inputs()
        values = (step.input_ids, step.positions, step.slot_mapping)
        for buf, value in zip((ids, positions, slots), values, strict=True):
            _write(buf[:n], value)
        _write(lens[:b], step.seq_lens)
        _write(tables[:b, :width], step.block_tables)
        _write(starts[: b + 1], step.query_start_loc)
        # Padding: tokens that write no cache slot, in one sequence over block
        # 0 (a query per token); the sequences after it have no query tokens.
        slots[n:size] = -1
        tables[b:size] = 0
        lens[b:size] = 1
        starts[b + 1 : size + 1] = size
        if n < size:
            lens[b] = size - n
            positions[n:size] = np.arange(size - n) if self._host else torch.arange(size - n)
        if size in self.graphs:
            return self.graphs[size].replay()[:n]
        return self._forward(size)[:n]


def _write(dst: np.ndarray | torch.Tensor, array: np.ndarray) -> None:
    if isinstance(dst, np.ndarray):
        dst[...] = array
    else:
        src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32))
        dst.copy_(src, non_blocking=True)
