"""Entry point of a tensor-parallel worker process: python -m tokenmill.worker RANK WORLD INIT_METHOD ARGS_JSON."""

import json
import sys

from tokenmill.config import EngineArgs
from tokenmill.distributed import worker_main

if __name__ == "__main__":
    rank, world, init_method, payload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    worker_main(rank, world, init_method, EngineArgs(**json.loads(payload)))
