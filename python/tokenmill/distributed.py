"""Tensor parallelism over torch.distributed (Gloo on CPU, NCCL on GPU).

Rank 0 runs the scheduler and broadcasts each step's inputs; every rank
holds 1/world of each layer and its own heads' KV cache; row-parallel
outputs are summed with all_reduce and the vocabulary-parallel logits are
gathered.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from tokenmill.engine.batch import StepInputs
from tokenmill.errors import InvalidParameterError, WorkerDiedError


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


def broadcast_step(step: StepInputs | None) -> StepInputs | None:
    """Rank 0 sends a step (None: stop); the other ranks receive it."""
    header = torch.zeros(2 + 2 * len(_FIELDS), dtype=torch.int64)
    if _group.rank == 0:
        if step is None:
            dist.broadcast(header, 0)
            return None
        header[0], header[1] = 1, step.num_decode_seqs
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
    return StepInputs(**values, num_decode_seqs=int(header[1]))


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher) started one process per rank and set RANK/WORLD_SIZE."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class WorkerGroup:
    """Ranks 1..world-1 as child processes of rank 0."""

    def __init__(self, processes: list[subprocess.Popen]):
        self.processes = processes

    def check(self) -> None:
        """Raises WorkerDiedError when a worker process is gone."""
        for i, p in enumerate(self.processes, start=1):
            if p.poll() is not None:
                raise WorkerDiedError(f"tensor-parallel worker {i} exited with code {p.returncode}")

    def stop(self) -> None:
        """Tells the workers to stop, waits for them (killing any that hang), leaves the group."""
        try:
            broadcast_step(None)
        except Exception:  # noqa: BLE001  (workers may be gone already)
            pass
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutdown()


def start(args, hf_config, device: torch.device, rank: int, init_method: str | None):
    """Joins (or, on rank 0 without a launcher, creates) the tensor-parallel
    group. Returns, on rank 0, the WorkerGroup of the other ranks (holding the
    processes it spawned, none under a launcher); elsewhere None."""
    world = args.tensor_parallel_size
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head", 1)
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % world or (kv % world and world % kv):
        raise InvalidParameterError(
            "tensor_parallel_size",
            f"tensor_parallel_size {world} must divide num_attention_heads ({heads}) and divide or be a "
            f"multiple of num_key_value_heads ({kv})",
        )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if init_method is None and launched_by_torchrun():
        init_method, rank = "env://", int(os.environ["RANK"])
        if int(os.environ["WORLD_SIZE"]) != world:
            raise InvalidParameterError(
                "tensor_parallel_size",
                f"tensor_parallel_size {world} differs from WORLD_SIZE {os.environ['WORLD_SIZE']}",
            )
    processes = []
    if rank == 0 and init_method is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        processes = spawn_workers(world, init_method, args)
    init(rank, world, init_method, device)
    return WorkerGroup(processes) if rank == 0 else None


def spawn_workers(world: int, init_method: str, args) -> list:
    """Starts ranks 1..world-1 as fresh interpreters (never re-running the caller's main module)."""
    import dataclasses
    import json
    import sys

    payload = json.dumps(dataclasses.asdict(args))
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tokenmill.worker", str(r), str(world), init_method, payload]
        )
        for r in range(1, world)
    ]
