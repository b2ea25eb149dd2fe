"""Python-side state of requests and their sequences."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class SequenceState:
    seq_id: int
    index: int
    detok: IncrementalDetokenizer | None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    emitted: int = 0  # characters of text released so far
    text_end: int | None = None  # set when a stop string cut the text
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def releasable_text(self) -> str:
        text = self.detok.text if self.detok else ""
        return text[: self.text_end] if self.text_end is not None else text[: self.emitted]

    def fork(self, seq_id: int, index: int) -> SequenceState:
        detok = None
        if self.detok is not None:
            detok = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
            detok.__dict__.update(self.detok.__dict__)
            detok.ids = list(self.detok.ids)
        return SequenceState(
            seq_id,
            index,
            detok,
            list(self.output_ids),
            [*self.logprobs] if self.logprobs is not None else None,
            self.cumulative_logprob,
            self.emitted,
        )


@dataclass
class RequestState:
    request_id: str
    core_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stop_checker: StopChecker
    beam: bool = False  # a beam search, whose outputs come whole at the end
    seqs: list[SequenceState] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    finished: bool = False
    aborted: bool = False  # the core gave the whole request up
    beam_outputs: list | None = None

    def seq(self, seq_id: int) -> SequenceState | None:
        for s in self.seqs:
            if s.seq_id == seq_id:
                return s
        return None

    def fork(self, parent: int, child: int) -> None:
        self.seqs.append(self.seq(parent).fork(child, len(self.seqs)))

    def all_finished(self) -> bool:
        """Every sequence the request will have exists and has finished."""
        expected = 1 if self.beam or self.aborted else self.params.num_sequences
        return len(self.seqs) >= expected and all(s.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        """A snapshot of everything generated so far."""
        if self.beam:
            return RequestOutput(
                self.request_id,
                self.prompt,
                self.prompt_ids,
                self.beam_outputs or [],
                self.finished,
                metrics=self.metrics,
            )
        seqs = self.seqs
        if self.finished and self.params.num_sequences > self.params.n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: self.params.n]
        outputs = []
        for i, s in enumerate(seqs):
            text = s.releasable_text()
            index = i if self.finished and self.params.num_sequences > self.params.n else s.index
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=list(s.output_ids),
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=s.logprobs,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            outputs=outputs,
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )
