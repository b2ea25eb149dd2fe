"""Tensor parallelism over torch.distributed (Gloo on CPU, NCCL on GPU).

Rank 0 runs the scheduler and broadcasts each step's inputs; every rank
holds 1/world of each layer and its own heads' KV cache; row-parallel
outputs are summed with all_reduce and the vocabulary-parallel logits are
gathered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    world: int = 1


_group = TPGroup()


def tp() -> TPGroup:
    return _group


def init(
    rank: int, world: int, init_method: str, device: torch.device, timeout_s: float = 30.0
) -> None:
    global _group
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    _group = TPGroup(rank, world)


def shutdown() -> None:
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = TPGroup()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _group.world == 1:
        return x
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # Gloo sums float32
        y = x.float()
        dist.all_reduce(y)
        return y.to(x.dtype)
    dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _group.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def split(n: int, what: str) -> int:
    if n % _group.world:
        raise ValueError(f"tensor_parallel_size {_group.world} must divide {what} ({n})")
    return n // _group.world


# ---------------------------------------------------------------- step inputs

_FIELDS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "seq_lens",
    "query_start_loc",
    "block_tables",
    "copies",
    "rows",
)


@dataclass
class StepInputs:
    """What a forward needs, from a SchedulerOutput on rank 0 or a broadcast elsewhere."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    block_tables: np.ndarray  # [num_seqs, max_blocks]
    copies: np.ndarray  # [num_copies, 2]
    rows: np.ndarray  # logit rows

    @classmethod
    def from_output(cls, out, rows) -> StepInputs:
        copies = np.asarray(out.block_copies, dtype=np.int32).reshape(-1, 2)
        return cls(
            out.input_ids,
            out.positions,
            out.slot_mapping,
            out.seq_lens,
            out.query_start_loc,
            out.block_tables,
            copies,
            np.asarray(rows, dtype=np.int32),
        )

    @property
    def block_copies(self) -> list[tuple[int, int]]:
        return [tuple(c) for c in self.copies.tolist()]


def broadcast_step(step: StepInputs | None) -> StepInputs | None:
    """Rank 0 sends a step (None: stop); the other ranks receive it."""
    header = torch.zeros(2 + 2 * len(_FIELDS), dtype=torch.int64)
    if _group.rank == 0:
        if step is None:
            dist.broadcast(header, 0)
            return None
        header[0] = 1
        arrays = [np.ascontiguousarray(getattr(step, f), dtype=np.int32) for f in _FIELDS]
        for i, a in enumerate(arrays):
            header[2 + 2 * i], header[3 + 2 * i] = (
                a.shape[0] if a.ndim else 0,
                a.shape[1] if a.ndim == 2 else -1,
            )
        dist.broadcast(header, 0)
        payload = torch.from_numpy(
            np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.int32)
        )
        dist.broadcast(payload, 0)
        return step
    dist.broadcast(header, 0)
    if header[0] == 0:
        return None
    shapes = [(int(header[2 + 2 * i]), int(header[3 + 2 * i])) for i in range(len(_FIELDS))]
    sizes = [r * (c if c >= 0 else 1) for r, c in shapes]
    payload = torch.empty(sum(sizes), dtype=torch.int32)
    dist.broadcast(payload, 0)
    values, offset = {}, 0
    for f, (r, c), size in zip(_FIELDS, shapes, sizes, strict=True):
        a = payload[offset : offset + size].numpy()
        values[f] = a.reshape(r, c) if c >= 0 else a
        offset += size
    return StepInputs(**values)


def worker_main(rank: int, world: int, init_method: str, args) -> None:
    """A non-zero rank: build the shard of the model, then run forwards until told to stop."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(args, tp_rank=rank, tp_init_method=init_method)
    try:
        while True:
            step = broadcast_step(None)
            if step is None:
                break
            engine.runner.execute_step(step)
    finally:
        shutdown()


def spawn_workers(world: int, init_method: str, args) -> list:
    """Starts ranks 1..world-1 as fresh interpreters (never re-running the caller's main module)."""
    import dataclasses
    import json
    import subprocess
    import sys

    payload = json.dumps(dataclasses.asdict(args))
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tokenmill.worker", str(r), str(world), init_method, payload]
        )
        for r in range(1, world)
    ]
