"""Microseconds per schedule+update step of the native core beside a pure-Python
scheduler with the same policy, at 64, 256 and 1024 running sequences.

  python -m bench.scheduler
"""

from __future__ import annotations

import time

import numpy as np
from tokenmill import _core

from bench.common import table
from bench.python_scheduler import PyScheduler

PROMPT, BLOCK = 64, 16


def native(n, steps):
    c = _core.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs = n * 64, BLOCK, n
    c.max_num_batched_tokens, c.max_model_len, c.enable_prefix_caching = n * PROMPT, 4096, False
    s = _core.Scheduler(c)
    for i in range(n):
        p = _core.RequestParams()
        p.max_tokens = 100000
        s.add_request(i, list(range(i, i + PROMPT)), p)
    out = s.schedule()  # all prompts in one step
    s.update(out, np.ones(out.sample_rows.size, np.int32))
    t = time.perf_counter()
    for _ in range(steps):
        out = s.schedule()
        s.update(out, np.ones(out.sample_rows.size, np.int32))
    return (time.perf_counter() - t) / steps * 1e6, out.num_seqs


def python(n, steps):
    s = PyScheduler(n * 64, BLOCK, n, n * PROMPT)
    for i in range(n):
        s.add_request(i, list(range(i, i + PROMPT)), 100000)
    out = s.schedule()
    s.update(out, [1] * sum(out.num_samples))
    t = time.perf_counter()
    for _ in range(steps):
        out = s.schedule()
        s.update(out, [1] * sum(out.num_samples))
    return (time.perf_counter() - t) / steps * 1e6, len(out.seq_ids)


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,256,1024", help="running sequences, comma-separated")
    args = ap.parse_args()
    rows = []
    for n in map(int, args.sizes.split(",")):
        steps = max(20, 20000 // n)
        nat, a = native(n, steps)
        py, b = python(n, steps)
        assert a == b == n
        rows.append([n, nat, py, py / nat])
    print("Scheduler step (schedule + update), decode of every running sequence")
    print(table(rows, ["running seqs", "native us/step", "python us/step", "native speed-up"]))


if __name__ == "__main__":
    main()
