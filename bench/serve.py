"""Load generator for OpenAI-compatible servers: start-up time, throughput,
TTFT and inter-token latency percentiles, from a token-id workload.

  python -m bench.serve --base-url http://127.0.0.1:8000/v1 --workload workload_small.json [--rates 4]
  python -m bench.serve --launch            # start `tokenmill serve` itself, timing start-up to /health
  python -m bench.serve --launch --vllm-python /path/to/venv/bin/python
                                            # then vLLM's server on the same model and arrivals

With --launch each server starts (the second start: files are in the page
cache), is timed to its first 200 on /health, serves the workload and stops
before the next one starts. Requests stream (stream=true); --rate gives
Poisson arrivals (seeded), 0 sends all at once.

  python -m bench.serve --launch --vllm-python VENV/bin/python --workload workload_main.json \
      --num-requests 64 --rates 0.6,1.0,0          # the latency-under-load comparison
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

import httpx

from bench.common import load_workload, table


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


async def one(client, url, model, req, results):
    body = {
        "model": model,
        "prompt": req["prompt_token_ids"],
        "max_tokens": req["max_tokens"],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", f"{url}/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    results.append((t0, stamps))


async def run(url, model, requests, rate):
    results = []
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1000)) as client:
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(one(client, url, model, req, results)))
            if rate:
                await asyncio.sleep(random.expovariate(rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return results, wall


def launch(port: int, cmd: list[str] | None = None, timeout: float = 600):
    """Starts a server (tokenmill serve by default) and times it to /health."""
    cmd = cmd or [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - t0 < timeout:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited during start-up")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not answer /health in {timeout} s")


def vllm_command(python: str, port: int) -> list[str]:
    """vLLM's server on the default model, dequantized (its best CPU dtype,
    bfloat16 where the CPU has AVX512-BF16, float32 otherwise)."""
    from tokenmill.cpu_policy import cpu_has_native_bf16
    from tokenmill.loader.gguf import gguf_to_hf
    from tokenmill.loader.hf import default_model_path

    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    return [
        *(python, "-m", "vllm.entrypoints.openai.api_server", "--model"),
        *(gguf_to_hf(default_model_path()), "--port", str(port), "--dtype", dtype),
        *("--enforce-eager", "--served-model-name", "SmolLM2-135M-Instruct"),
    ]


def measure(url, model, requests, rate, seed):
    random.seed(seed)
    results, wall = asyncio.run(run(url, model, requests, rate))
    ttft = [s[0] - t0 for t0, s in results if s]
    itl = [b - a for _, s in results for a, b in zip(s, s[1:], strict=False)]
    out_tokens = sum(r["max_tokens"] for r in requests)
    total = out_tokens + sum(len(r["prompt_token_ids"]) for r in requests)
    return {
        "out_tok_s": out_tokens / wall,
        "total_tok_s": total / wall,
        "wall": wall,
        "ttft": [pct(ttft, q) * 1e3 for q in (50, 90, 99)],
        "itl": [pct(itl, q) * 1e3 for q in (50, 90, 99)],
    }


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", default=None)
    ap.add_argument(
        "--model", default=None, help="model name to send (default: the server's first)"
    )
    ap.add_argument("--workload", default="workload_small.json")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument(
        "--rates",
        default="0",
        help="requests/s, Poisson, comma-separated, each a run (0: all at once, saturation)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrivals")
    ap.add_argument("--launch", action="store_true", help="start tokenmill serve on a free port")
    ap.add_argument("--vllm-python", default=None, help="with --launch: also vLLM, from this venv")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds idle after /health")
    ap.add_argument(
        "--tokenmill-args",
        default="",
        help="extra flags for tokenmill serve, e.g. '--max-itl-ms 0'",
    )
    args = ap.parse_args()
    requests = load_workload(args.workload, args.num_requests)
    engines = [("server", None)]
    if args.launch:
        cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(args.port)]
        engines = [("tokenmill", cmd + args.tokenmill_args.split())]
        if args.vllm_python:
            # vLLM's best CPU settings on a quiet two-core machine (bench/peers/vllm_runner.py)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            engines.append(("vLLM", vllm_command(args.vllm_python, args.port)))
    rates = [float(r) for r in args.rates.split(",")]
    rows, startup = [], []
    for name, cmd in engines:
        proc = None
        if args.launch:
            first, _ = launch(args.port, cmd)  # a first start fills the page cache
            first.terminate()
            first.wait()
            proc, seconds = launch(args.port, cmd)
            startup.append([name, seconds])
            print(f"{name}: first 200 on /health after {seconds:.2f} s", flush=True)
            # steady state: tokenmill commits its KV cache and captures decode
            # graphs once it is up and idle; vLLM warms up before /health
            time.sleep(args.settle)
            args.base_url = f"http://127.0.0.1:{args.port}/v1"
        try:
            model = args.model or httpx.get(f"{args.base_url}/models").json()["data"][0]["id"]
            for rate in rates:
                m = measure(args.base_url, model, requests, rate, args.seed)
                print(
                    f"{name} at {rate or 'saturation'} req/s: {len(requests)} requests in "
                    f"{m['wall']:.1f} s: {m['out_tok_s']:.1f} output tok/s, "
                    f"{m['total_tok_s']:.1f} total tok/s",
                    flush=True,
                )
                rows.append([name, rate or "all", m["out_tok_s"], *m["ttft"], *m["itl"]])
        finally:
            if proc:
                proc.terminate()
                proc.wait()
    if startup:
        print(table(startup, ["server", "start-up s (to /health)"]))
    header = [
        "server",
        "req/s",
        "out tok/s",
        "TTFT p50 ms",
        "p90",
        "p99",
        "ITL p50 ms",
        "p90",
        "p99",
    ]
    print(table(rows, header))


if __name__ == "__main__":
    main()
