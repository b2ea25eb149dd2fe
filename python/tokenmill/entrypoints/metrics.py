"""Prometheus metrics of the engine, labelled with the served model name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenmill.engine.events import EngineStats
from tokenmill.outputs import RequestOutput

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc):
            return Histogram(
                f"tokenmill:{name}", doc, labels, buckets=LATENCY_BUCKETS, registry=r
            ).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences running in the engine")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.kv_free = gauge("kv_cache_free_blocks", "KV-cache blocks free")
        self.kv_total = gauge("kv_cache_total_blocks", "KV-cache blocks in all")
        self.prefix_queries = counter(
            "prefix_cache_queries", "Full blocks looked up in the prefix cache"
        )
        self.prefix_hits = counter("prefix_cache_hits", "Full blocks found in the prefix cache")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens received")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.preemptions = counter("num_preemptions", "Requests preempted for lack of KV blocks")
        self.draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tokens verified (speculative decoding)"
        )
        self.accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted (speculative decoding)"
        )
        self.finished = counter("request_success", "Requests finished")
        self.aborted = counter("request_aborted", "Requests aborted (client gone or cancelled)")
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token")
        self.itl = histogram("inter_token_latency_seconds", "Mean time between tokens of a request")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to finish")
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to first scheduling"
        )
        self.step_time = histogram("step_time_seconds", "Time of one engine step's forward")
        self.prefill_tokens_per_step = Histogram(
            "tokenmill:prefill_tokens_per_step",
            "Prompt tokens a step computed beside its decode rows (the step-time budget's choice)",
            labels,
            buckets=(0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        ).labels(model_name)
        self._seen = {}

    def observe_engine(self, st: EngineStats) -> None:
        self.running.set(st.num_running_seqs)
        self.waiting.set(st.num_waiting_requests)
        self.kv_free.set(st.num_free_blocks)
        self.kv_total.set(st.num_blocks)
        self.kv_usage.set(st.kv_cache_usage)
        for name, value in (
            ("prefix_queries", st.prefix_queries),
            ("prefix_hits", st.prefix_hits),
            ("prompt_tokens", st.prompt_tokens),
            ("generation_tokens", st.generation_tokens),
            ("preemptions", st.preemptions),
            ("draft_tokens", st.draft_tokens),
            ("accepted_tokens", st.accepted_tokens),
        ):
            delta = value - self._seen.get(name, 0)
            if delta > 0:
                getattr(self, name).inc(delta)
                self._seen[name] = value

    def observe_steps(self, steps) -> None:
        """Steps as run (engine.core.step_times, drained by the caller)."""
        for st in steps:
            self.step_time.observe(st.ms / 1e3)
            self.prefill_tokens_per_step.observe(st.prefill_tokens)

    def observe_finished(self, out: RequestOutput) -> None:
        self.finished.inc()
        m = out.metrics
        if m is None or m.finished_time is None:
            return
        self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            n = max((len(o.token_ids) for o in out.outputs), default=0)
            if n > 1 and m.last_token_time is not None:
                self.itl.observe((m.last_token_time - m.first_token_time) / (n - 1))
