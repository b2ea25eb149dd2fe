"""What generation returns, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the top-k and the sampled token).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None
    score: float | None = None  # beam search: cumulative_logprob / length ** length_penalty

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class BeamSearchSequence:
    """One beam-search hypothesis, shaped like vLLM's: tokens and text include the prompt."""

    tokens: list[int]
    cum_logprob: float
    text: str
    finish_reason: str | None = None  # "stop" (ended in EOS) or "length"
    score: float | None = None  # cum_logprob / generated_length ** length_penalty


@dataclass
class BeamSearchOutput:
    """The hypotheses of one beam search, best score first."""

    sequences: list[BeamSearchSequence]
