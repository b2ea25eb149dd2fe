"""How far a single-stream decode step is from its memory-bound floor.

A decode step of a small model on a CPU reads every weight once, so its time
is the time to stream the weights plus everything else (attention, small ops,
Python). This machine's memory bandwidth moves from second to second, so the
two are measured alternately in one process: the step (one request decoding)
and one dense GEMV over a matrix of the same number of bytes (the stream).
Printed: both, their difference (the fixed overhead), a least-squares line
step = a + b * stream over the pairs, and what the step would take where the
weights stream at a given bandwidth.

  python -m bench.step_floor [--model M] [--dtype bfloat16] [--pairs 60]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--steps-per-pair", type=int, default=5)
    args = ap.parse_args()
    import time

    from tokenmill import SamplingParams
    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.host_memory import huge_page_empty
    from tokenmill.layers.gguf_linear import GGUFLinear
    from tokenmill.loader.hf import resolve_model_path

    path = resolve_model_path(args.model)
    engine = LLMEngine(EngineArgs(model=path, dtype=args.dtype, max_model_len=2048))
    steps = args.pairs * args.steps_per_pair + 20
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    engine.add_request("r", {"prompt_token_ids": list(range(100, 228))}, params)
    for _ in range(10):
        engine.step()

    model = engine.runner.model
    blocks = [r.data for m in model.modules() if isinstance(m, GGUFLinear) for r in m.runs]
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *blocks])
    weight_dtype = engine.runner.dtype
    k = 576
    weight = huge_page_empty((nbytes // weight_dtype.itemsize // k, k), weight_dtype)
    weight.normal_()
    x = torch.randn(1, k, dtype=weight_dtype)
    out = torch.empty(1, weight.shape[0], dtype=weight_dtype)

    def stream() -> float:
        t = time.perf_counter()
        torch.ops.tokenmill.linear(out, x, weight)
        return time.perf_counter() - t

    step_ms, stream_ms = [], []
    for _ in range(args.pairs):
        before = stream()
        t = time.perf_counter()
        for _ in range(args.steps_per_pair):
            engine.step()
        step_ms.append((time.perf_counter() - t) / args.steps_per_pair * 1e3)
        stream_ms.append((before + stream()) / 2 * 1e3)
    step, streamed = np.array(step_ms), np.array(stream_ms)
    slope, intercept = np.polyfit(streamed, step, 1)
    overhead = float(np.median(step - streamed))
    gb = nbytes / 1e9
    print(
        f"{args.pairs} pairs; weights {gb * 1e3:.0f} MB streamed in {streamed.min():.2f}-"
        f"{streamed.max():.2f} ms ({gb / streamed.max() * 1e3:.1f}-"
        f"{gb / streamed.min() * 1e3:.1f} GB/s); step {step.min():.2f}-{step.max():.2f} ms"
    )
    print(
        f"median step {np.median(step):.2f} ms, median stream {np.median(streamed):.2f} ms, "
        f"median overhead (step - stream) {overhead:.2f} ms"
    )
    print(
        f"fit: step = {intercept:.2f} ms + {slope:.2f} x stream "
        f"(r = {np.corrcoef(streamed, step)[0, 1]:.2f})"
    )
    rows = []
    for bandwidth in (20, 25, 30, 36):
        ms = gb / bandwidth * 1e3
        rows.append([bandwidth, ms, ms + overhead, intercept + slope * ms])
    print(
        table(
            rows,
            ["weights GB/s", "stream ms", "step ms (+ median overhead)", "step ms (fit)"],
        )
    )


if __name__ == "__main__":
    main()
