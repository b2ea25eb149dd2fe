"""A tensor-parallel rank above 0: python -m tokenmill.worker RANK WORLD INIT_METHOD ARGS_JSON.

It builds only a ModelRunner (no tokenizer, no scheduler) and runs the
forwards rank 0 broadcasts until told to stop."""

import json
import os
import sys

import torch

from tokenmill import distributed
from tokenmill.config import EngineArgs
from tokenmill.engine.builder import build_runner, resolve_model


def run_worker(rank: int, world: int, init_method: str, args: EngineArgs) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))
    runner = build_runner(args, resolve_model(args), rank, init_method)
    try:
        while (step := distributed.broadcast_step(None)) is not None:
            runner.logits(step)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    rank, world, init_method, payload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    run_worker(rank, world, init_method, EngineArgs(**json.loads(payload)))
