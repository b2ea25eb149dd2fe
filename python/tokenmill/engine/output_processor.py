"""OutputProcessor: detokenizes, finds stop strings and builds RequestOutputs from engine events."""

from __future__ import annotations

import time

from tokenmill.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.engine.events import (
    BeamSearchFinished,
    EngineEvent,
    PromptLogprobsComputed,
    RequestStarted,
    SequenceFinished,
    SequenceForked,
    TokenAppended,
)
from tokenmill.engine.request import RequestState, SequenceState
from tokenmill.errors import InvalidParameterError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams


class OutputProcessor:
    """Keeps the text side of each request, keyed by the caller's request id.

    A stop string ends a sequence here; the core learns of it through
    take_stopped() before its next step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[int, RequestState] = {}  # by the core's id
        self.core_ids: dict[str, int] = {}  # caller's id -> core's id
        self._stopped: list[tuple[int, int]] = []

    def check_new(self, request_id: str) -> None:
        if request_id in self.core_ids:
            raise InvalidParameterError("request_id", f"duplicate request id {request_id!r}")

    def add(
        self,
        request_id: str,
        core_id: int,
        first_seq: int,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams | BeamSearchParams,
    ) -> None:
        """Follows a request the core accepted, whose first sequence is first_seq."""
        beam = isinstance(params, BeamSearchParams)
        if beam:
            params = SamplingParams(n=1, max_tokens=params.max_tokens, temperature=0)
        state = RequestState(
            request_id,
            core_id,
            prompt,
            prompt_ids,
            params,
            StopChecker(params.stop, params.include_stop_str_in_output),
            beam=beam,
        )
        detok = (
            None
            if beam
            else IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        )
        state.seqs.append(
            SequenceState(first_seq, 0, detok, logprobs=[] if params.needs_logprobs else None)
        )
        self.requests[core_id] = state
        self.core_ids[request_id] = core_id

    def abort(self, request_id: str) -> int | None:
        """Forgets a request; returns its core id (None if unknown)."""
        core_id = self.core_ids.pop(request_id, None)
        if core_id is not None:
            self.requests.pop(core_id)
        return core_id

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def take_stopped(self) -> list[tuple[int, int]]:
        """(core request id, sequence id) of sequences stop strings ended since the last call."""
        stopped, self._stopped = self._stopped, []
        return stopped

    def process(self, events: list[EngineEvent]) -> list[RequestOutput]:
        """Applies a step's events; returns the outputs of the requests they touched."""
        touched: dict[int, RequestState] = {}
        now = time.monotonic()
        for e in events:
            state = self.requests.get(e.request_id)
            if state is None:
                continue
            touched[e.request_id] = state
            if isinstance(e, TokenAppended):
                self._append(state, e, now)
            elif isinstance(e, SequenceForked):
                state.fork(e.parent, e.child)
            elif isinstance(e, RequestStarted):
                if state.metrics.first_scheduled_time is None:
                    state.metrics.first_scheduled_time = now
                    state.num_cached_tokens = e.num_cached_tokens
            elif isinstance(e, SequenceFinished):
                state.aborted |= e.seq_id == -1
                for s in state.seqs:
                    if e.seq_id in (-1, s.seq_id) and not s.finished:
                        s.finish_reason = e.reason
            elif isinstance(e, PromptLogprobsComputed):
                state.prompt_logprobs = (state.prompt_logprobs or [None]) + e.entries
            elif isinstance(e, BeamSearchFinished):
                state.beam_outputs = self._beam_outputs(e)
                for s in state.seqs:
                    s.finish_reason = s.finish_reason or "stop"
        return [self._output(state, now) for state in touched.values()]

    def _append(self, state: RequestState, e: TokenAppended, now: float) -> None:
        seq = state.seq(e.seq_id)
        if seq.finished:  # a stop string ended it earlier in this step
            return
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        state.metrics.last_token_time = now
        seq.output_ids.append(e.token)
        if e.logprob is not None:
            seq.cumulative_logprob += e.logprob
            if state.params.logprobs is not None:
                seq.logprobs.append(e.top_logprobs)
        by_token = e.finish_reason == "stop" and e.stop_token is not None
        delta = (
            ""
            if by_token and not state.params.include_stop_str_in_output
            else seq.detok.add(e.token)
        )
        match, seq.emitted = state.stop_checker.check(seq.detok.text, len(delta))
        if match is not None:
            seq.text_end = seq.emitted
            seq.finish_reason, seq.stop_reason = "stop", match
            if e.finish_reason is None:
                self._stopped.append((state.core_id, seq.seq_id))
        elif e.finish_reason is not None:
            seq.finish_reason = e.finish_reason
            # As in the OpenAI API, only a requested stop id is a stop_reason, not EOS.
            user_stop = by_token and e.stop_token in state.params.stop_token_ids
            seq.stop_reason = e.stop_token if user_stop else None
            seq.text_end = len(seq.detok.text)

    def _beam_outputs(self, e: BeamSearchFinished) -> list[CompletionOutput]:
        return [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(h.tokens, skip_special_tokens=True),
                token_ids=h.tokens,
                cumulative_logprob=h.logprob,
                logprobs=None,
                finish_reason=reason,
                score=h.score,
            )
            for i, (h, reason) in enumerate(zip(e.hypotheses, e.finish_reasons, strict=True))
        ]

    def _output(self, state: RequestState, now: float) -> RequestOutput:
        if state.all_finished():
            state.finished = True
            state.metrics.finished_time = now
            self.requests.pop(state.core_id, None)
            self.core_ids.pop(state.request_id, None)
        return state.to_output()
