"""Soak test of an OpenAI-compatible server: a steady Poisson load mixing
streamed and whole responses, n > 1, clients that hang up and bad requests,
for a fixed time; per interval: requests, latency p50/p99, errors, the
server's RSS; at the end: RSS growth after warm-up, 5xx count, and the KV
cache in use once the load stops (it must be 0).

  python -m bench.soak --launch                      # tokenmill serve, 10 minutes
  python -m bench.soak --base-url http://127.0.0.1:8000 --pid 1234 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from bench.common import table
from bench.serve import launch, pct

PROMPTS = [
    "The history of the printing press",
    "Write a short poem about rivers.",
    "Explain how a bicycle stays upright.",
    "List three facts about the Moon.",
    "Once upon a time in a small village,",
]
KINDS = ("stream", "whole", "n2", "hangup", "bad")
WEIGHTS = (0.35, 0.3, 0.1, 0.15, 0.1)


@dataclass
class Record:
    start: float
    kind: str
    status: int
    latency: float


@dataclass
class Soak:
    url: str
    model: str
    rng: random.Random
    records: list[Record] = field(default_factory=list)

    async def one(self, client: httpx.AsyncClient, kind: str, t0: float) -> None:
        messages = [{"role": "user", "content": self.rng.choice(PROMPTS)}]
        body = {"model": self.model, "messages": messages, "max_tokens": self.rng.randint(8, 48)}
        status = 0
        try:
            if kind == "bad":
                body = self.rng.choice(
                    [
                        {**body, "temperature": -1},
                        {**body, "logit_bias": {"99999999": 1}},
                        {**body, "messages": []},
                        {**body, "n": 10**6},
                    ]
                )
                r = await client.post(f"{self.url}/v1/chat/completions", json=body)
                status = r.status_code
            elif kind in ("stream", "hangup"):
                body["stream"] = True
                async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                    status = r.status_code
                    chunks = 0
                    async for _ in r.aiter_lines():
                        chunks += 1
                        if kind == "hangup" and chunks >= 3:
                            break  # leaving the block closes the connection mid-stream
            else:
                if kind == "n2":
                    body.update(n=2, temperature=0.8)
                r = await client.post(f"{self.url}/v1/chat/completions", json=body)
                status = r.status_code
        except httpx.HTTPError:
            status = -1
        self.records.append(Record(t0, kind, status, time.monotonic() - t0))

    async def run(self, duration: float, rate: float) -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=500)) as c:
            tasks = []
            end = time.monotonic() + duration
            while time.monotonic() < end:
                kind = self.rng.choices(KINDS, WEIGHTS)[0]
                tasks.append(asyncio.create_task(self.one(c, kind, time.monotonic())))
                await asyncio.sleep(self.rng.expovariate(rate))
            await asyncio.gather(*tasks)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def sample_rss(pid: int, every: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), rss_mb(pid)))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def soak(url: str, pid: int, duration: float, rate: float, interval: float, seed: int) -> dict:
    """Runs the load and returns the summary (and prints the tables)."""
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    job = Soak(url, model, random.Random(seed))
    samples: list[tuple[float, float]] = []

    async def main():
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, min(5.0, interval / 4), samples, stop))
        await job.run(duration, rate)
        stop.set()
        await sampler

    t0 = time.monotonic()
    asyncio.run(main())
    time.sleep(1.0)  # aborted requests leave the engine within its next steps
    rows = []
    for k in range(max(1, int(duration // interval))):
        lo, hi = t0 + k * interval, t0 + (k + 1) * interval
        recs = [r for r in job.records if lo <= r.start < hi]
        ok = [r.latency for r in recs if r.kind in ("stream", "whole", "n2") and r.status == 200]
        rss = [m for t, m in samples if lo <= t < hi]
        rows.append(
            [
                f"{k * interval:.0f}-{(k + 1) * interval:.0f} s",
                len(recs),
                pct(ok, 50),
                pct(ok, 99),
                sum(r.status >= 500 or r.status == -1 for r in recs),
                max(rss) if rss else float("nan"),
            ]
        )
    print(table(rows, ["interval", "requests", "p50 s", "p99 s", "5xx", "RSS MiB"]))
    warm = [m for t, m in samples if t >= t0 + min(interval, duration / 2)]
    summary = {
        "requests": len(job.records),
        "server_errors": sum(r.status >= 500 or r.status == -1 for r in job.records),
        "bad_requests_refused": all(400 <= r.status < 500 for r in job.records if r.kind == "bad"),
        "rss_growth": (max(warm) / warm[0] - 1) if warm else float("nan"),
        "kv_cache_usage_end": metric(url, "tokenmill:kv_cache_usage_perc"),
        "running_end": metric(url, "tokenmill:num_requests_running"),
    }
    print(json.dumps(summary))
    return summary


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--pid", type=int, default=None, help="the server's process (for its RSS)")
    ap.add_argument("--launch", action="store_true", help="start tokenmill serve on a free port")
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds per table row")
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s, Poisson")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    proc = None
    if args.launch:
        proc, startup = launch(args.port)
        print(f"tokenmill serve ready after {startup:.2f} s")
        args.base_url, args.pid = f"http://127.0.0.1:{args.port}", proc.pid
    if args.base_url is None or args.pid is None:
        sys.exit("give --launch, or --base-url and --pid")
    try:
        soak(args.base_url, args.pid, args.duration, args.rate, args.interval, args.seed)
    finally:
        if proc:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
