"""EngineCore: schedule -> run the model -> update the core -> events."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenmill import _core
from tokenmill.engine.batch import RunnerOutput, SamplingBatch
from tokenmill.engine.draft_model import DraftModelProposer
from tokenmill.engine.events import (
    BeamSearchFinished,
    EngineEvent,
    EngineStats,
    PromptLogprobsComputed,
    RequestStarted,
    SequenceFinished,
    SequenceForked,
    StepTime,
    TokenAppended,
)
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.strategies import RequestStrategy
from tokenmill.errors import InvalidParameterError

APPENDED, FORKED = _core.EventKind.APPENDED, _core.EventKind.FORKED


@dataclass
class EngineRequest:
    """A request as the core takes it: token ids, the core's parameters, and
    how to build its strategy once its first sequence exists."""

    request_id: int
    prompt_ids: list[int]
    core_params: _core.RequestParams
    make_strategy: Callable[[int], RequestStrategy]


class EngineCore:
    """Runs steps over the native scheduler and a ModelRunner. Knows requests
    only by the core's integer ids and reports what happened as EngineEvents."""

    def __init__(
        self,
        scheduler: _core.Scheduler,
        runner: ModelRunner,
        drafter: DraftModelProposer | None = None,
    ):
        self.scheduler = scheduler
        self.runner = runner
        self.drafter = drafter  # draft-model speculation: fills the rows schedule() reserves
        if drafter is not None:
            scheduler.set_draft_forward_ms(drafter.forward_ms)
        # measured steps, for the metrics (the scheduler keeps its own fit)
        self.step_times: deque[StepTime] = deque(maxlen=4096)
        self.strategies: dict[int, RequestStrategy] = {}
        self.prompt_tokens = self.generation_tokens = self.preemptions = 0
        self._finishing: list[tuple[int, int]] = []  # (request, sequence) ended by stop strings

    def add_request(self, request: EngineRequest) -> int:
        """Queues a request and returns its first sequence's id; raises
        InvalidParameterError when the core refuses it."""
        try:
            seq = self.scheduler.add_request(
                request.request_id, request.prompt_ids, request.core_params
            )
        except ValueError as e:
            raise InvalidParameterError("prompt", str(e)) from e
        self.strategies[request.request_id] = request.make_strategy(seq)
        self.prompt_tokens += len(request.prompt_ids)
        return seq

    def abort_request(self, request_id: int) -> None:
        """Stops a request now and frees its KV blocks."""
        self.scheduler.abort_request(request_id)
        self.strategies.pop(request_id, None)

    def finish_sequences(self, seqs: list[tuple[int, int]]) -> None:
        """Ends (request id, sequence id) pairs at the next step, before it schedules."""
        self._finishing += seqs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finishing)

    def step(self) -> list[EngineEvent]:
        """Runs one batch and returns what happened to the requests in it."""
        self._apply_finishing()
        plan = self.scheduler.schedule()
        events = self._plan_events(plan)
        if plan.num_seqs:
            if self.drafter is not None:
                self.drafter.propose(plan, self.scheduler)
            batch, sampled = self._batch(plan)
            t0 = time.perf_counter()
            output = self.runner.execute(plan, batch)
            ms = (time.perf_counter() - t0) * 1e3
            decodes = plan.decode_tokens
            self.scheduler.observe_step(plan, ms)
            self.step_times.append(StepTime(plan.num_tokens - decodes, decodes, ms))
            tokens, counts, slots = self._continuations(plan, batch, output, sampled)
            result = self.scheduler.update(plan, tokens, counts)
            events += self._mirror(result, batch, output, slots, sampled)
        return events

    def stats(self) -> EngineStats:
        st = self.scheduler.stats()
        return EngineStats(
            st.num_running_seqs,
            st.num_waiting_requests,
            st.num_free_blocks,
            st.num_blocks,
            st.prefix_queries,
            st.prefix_hits,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            st.draft_tokens,
            st.accepted_tokens,
        )

    # ------------------------------------------------------------------ parts
    def _apply_finishing(self) -> None:
        for rid, seq in self._finishing:
            self.scheduler.finish_sequence(seq, "stop")
            if not self.scheduler.has_request(rid):
                self.strategies.pop(rid, None)
        self._finishing.clear()

    def _plan_events(self, plan) -> list[EngineEvent]:
        self.preemptions += len(plan.preempted)
        for rid in plan.preempted:
            self.strategies[rid].restart()
        events: list[EngineEvent] = [RequestStarted(r, n) for r, n in plan.admitted]
        for rid in plan.aborted:  # could never fit in the cache
            events.append(SequenceFinished(rid, -1, "abort"))
            self.strategies.pop(rid, None)
        return events

    def _batch(self, plan) -> tuple[SamplingBatch, dict[int, RequestStrategy]]:
        """What to read from the step's logits, asked of each scheduled sequence's strategy."""
        batch = SamplingBatch(plan.sample_rows)
        sampled: dict[int, RequestStrategy] = {}
        strategies = self.strategies
        row = 0
        for i, (rid, k, drafts) in enumerate(
            zip(
                plan.request_ids.tolist(),
                plan.num_samples.tolist(),
                plan.num_draft.tolist(),
                strict=True,
            )
        ):
            strategy = strategies[rid]
            strategy.schedule(batch, plan, i, row, k)
            if k:
                sampled[rid] = strategy
                row += 1 + drafts  # a row per draft token and one after them
        return batch, sampled

    def _continuations(self, plan, batch: SamplingBatch, output: RunnerOutput, sampled: dict):
        """Tokens for update() in plan order, their count per sequence (None:
        the plan's num_samples) and per token the runner slot it came from (-1: none; None: itself)."""
        if (
            not batch.logprob_rows and not plan.num_draft.any()
        ):  # one slot per sample, in plan order
            return output.tokens, None, None
        chosen: dict[int, list[int]] = {}
        for strategy in sampled.values():
            chosen.update(strategy.choose(output))
        slot_of: dict[int, list[int]] = {}
        for slot, s in enumerate(batch.slots):
            slot_of.setdefault(s.seq_id, []).append(slot)
        tokens, slots = [], []
        counts = np.zeros(plan.num_seqs, np.int32)
        for i, seq in enumerate(plan.seq_ids.tolist()):
            toks = chosen.get(seq, [])
            counts[i] = len(toks)
            tokens += toks
            slots += slot_of.get(seq, [-1] * len(toks))[: len(toks)]
        return np.asarray(tokens, np.int32), counts, slots

    def _mirror(self, result, batch, output, slots, sampled) -> list[EngineEvent]:
        """The one place the core's events reach Python: strategies follow
        them, and they become EngineEvents with the runner's logprobs."""
        events: list[EngineEvent] = []
        lps, tops = output.sampled_logprobs, output.top_logprobs
        strategies = self.strategies
        last = None
        for e in result.events:
            strategy = strategies[e.request_id]
            strategy.mirror(e)
            if not strategy.streams_tokens:
                continue
            if e.kind == APPENDED:
                self.generation_tokens += 1
                slot = e.sample if slots is None else slots[e.sample]
                last = TokenAppended(e.request_id, e.seq_id, e.token)
                if lps is not None and slot >= 0:
                    last.logprob, last.top_logprobs = lps[slot], tops[slot]
                events.append(last)
            elif e.kind == FORKED:
                events.append(SequenceForked(e.request_id, e.parent, e.seq_id))
            elif last is not None and last.seq_id == e.seq_id:  # ended by the token just added
                last.finish_reason = e.reason
                last.stop_token = e.token if e.token >= 0 else None
            else:
                events.append(SequenceFinished(e.request_id, e.seq_id, e.reason))
        for target, entries in zip(batch.prompt_targets, output.prompt_logprobs, strict=True):
            events.append(PromptLogprobsComputed(target.request_id, entries))
        for rid, strategy in sampled.items():
            for event in strategy.end_step():
                if isinstance(event, BeamSearchFinished):
                    self.generation_tokens += sum(len(h.tokens) for h in event.hypotheses)
                events.append(event)
            if strategy.done:
                self.abort_request(rid)
        for rid in result.finished_requests:
            strategies.pop(rid, None)
        return events
