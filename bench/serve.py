"""Load generator for any OpenAI-compatible server: throughput, TTFT and
inter-token latency percentiles, from a token-id workload.

  python -m bench.serve --base-url http://127.0.0.1:8000/v1 --workload workload_small.json [--rate 4]
  python -m bench.serve --launch            # start `tokenmill serve` itself, timing start-up to /health

Requests stream (stream=true); --rate gives Poisson arrivals, otherwise all
are sent at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def launch(port: int):
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.05)


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
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s, Poisson (0: all at once)")
    ap.add_argument("--launch", action="store_true", help="start tokenmill serve on a free port")
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()
    proc = None
    if args.launch:
        proc, startup = launch(args.port)
        print(f"tokenmill serve: first 200 on /health after {startup:.2f} s")
        args.base_url = f"http://127.0.0.1:{args.port}/v1"
    try:
        model = args.model or httpx.get(f"{args.base_url}/models").json()["data"][0]["id"]
        requests = load_workload(args.workload, args.num_requests)
        results, wall = asyncio.run(run(args.base_url, model, requests, args.rate))
    finally:
        if proc:
            proc.terminate()
            proc.wait()
    ttft = [s[0] - t0 for t0, s in results if s]
    itl = [b - a for _, s in results for a, b in zip(s, s[1:], strict=False)]
    out_tokens = sum(r["max_tokens"] for r in requests)
    total = out_tokens + sum(len(r["prompt_token_ids"]) for r in requests)
    print(
        f"{len(requests)} requests in {wall:.1f} s: {out_tokens / wall:.1f} output tok/s, {total / wall:.1f} total tok/s"
    )
    rows = [
        ["TTFT ms"] + [pct(ttft, q) * 1e3 for q in (50, 90, 99)],
        ["ITL ms"] + [pct(itl, q) * 1e3 for q in (50, 90, 99)],
    ]
    print(table(rows, ["", "p50", "p90", "p99"]))


if __name__ == "__main__":
    main()
