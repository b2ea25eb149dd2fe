"""What EngineCore.step reports: typed events keyed by the core's request and sequence ids."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.beam_search import Hypothesis
from tokenmill.outputs import Logprob


@dataclass(slots=True)
class RequestStarted:
    """The request was scheduled (first, or again after a preemption)."""

    request_id: int
    num_cached_tokens: int  # prompt tokens the prefix cache held


@dataclass(slots=True)
class SequenceForked:
    request_id: int
    parent: int
    child: int


@dataclass(slots=True)
class TokenAppended:
    """A token joined a sequence; finish_reason is set when it also ended it."""

    request_id: int
    seq_id: int
    token: int
    logprob: float | None = None
    top_logprobs: dict[int, Logprob] | None = None
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop id that ended the sequence (EOS included)


@dataclass(slots=True)
class SequenceFinished:
    """A sequence ended without a new token (aborted, or dropped by its request)."""

    request_id: int
    seq_id: int
    reason: str


@dataclass(slots=True)
class PromptLogprobsComputed:
    request_id: int
    entries: list[dict[int, Logprob]]  # one per prompt position, in order


@dataclass(slots=True)
class BeamSearchFinished:
    request_id: int
    hypotheses: list[Hypothesis]  # best score first
    finish_reasons: list[str]  # per hypothesis: "stop" (ended in EOS) or "length"


EngineEvent = (
    RequestStarted
    | SequenceForked
    | TokenAppended
    | SequenceFinished
    | PromptLogprobsComputed
    | BeamSearchFinished
)


@dataclass(frozen=True)
class StepTime:
    """One step as run: prefill tokens, decode rows, and its time."""

    prefill_tokens: int
    decode_rows: int
    ms: float


@dataclass(frozen=True)
class EngineStats:
    """The engine's gauges and counters, as metrics and logs read them."""

    num_running_seqs: int
    num_waiting_requests: int
    num_free_blocks: int
    num_blocks: int
    prefix_queries: int
    prefix_hits: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    draft_tokens: int = 0  # speculative decoding: draft tokens verified
    accepted_tokens: int = 0  # of those, accepted

    @property
    def kv_cache_usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks
