"""Request strategies: how a request's sampled rows become continuations, and
the bookkeeping each keeps of its sequences in the core.

EngineCore asks each strategy, per step: which rows to read (`schedule`), what
each sampled sequence continues with (`choose`: one token extends it, more
fork it, none drops it), and then hands it the core's events (`mirror`) and
the step's end (`end_step`)."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill import _core
from tokenmill.engine.batch import PromptLogprobTarget, RunnerOutput, SampleSlot, SamplingBatch
from tokenmill.engine.beam_search import BeamSearchState
from tokenmill.engine.events import BeamSearchFinished
from tokenmill.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.structured_output import Grammar, GrammarMatcher


class RequestStrategy:
    request_id: int
    streams_tokens = True  # whether its tokens are published as they come
    done = False  # whether it ended the request itself

    def schedule(self, batch: SamplingBatch, plan, i: int, row: int, num_samples: int) -> None:
        """Adds what scheduled sequence i of the plan needs (row: its sample row, if num_samples)."""

    def choose(self, output: RunnerOutput) -> dict[int, list[int]]:
        """Per sequence sampled this step, the tokens that continue it."""
        raise NotImplementedError

    def mirror(self, event) -> None:
        """Follows one of the core's events (a _core.SeqEvent) about this request."""

    def end_step(self) -> list:
        """After the step's events; returns engine events of its own."""
        return []

    def restart(self) -> None:
        """The core restarted the request from its prompt (a preemption)."""


class SamplingStrategy(RequestStrategy):
    """Independent samples: n (or best_of) sequences forked from the prompt at the first sample."""

    def __init__(
        self,
        request_id: int,
        first_seq: int,
        prompt_ids: list[int],
        params: SamplingParams,
        eos_token_id: int | None,
        grammar: Grammar | None = None,
    ):
        self.request_id = request_id
        self.first_seq = first_seq
        self.prompt_ids = prompt_ids
        self.params = params
        self.eos_token_id = eos_token_id
        self.outputs: dict[int, list[int]] = {first_seq: []}  # seq id -> generated tokens
        self.index: dict[int, int] = {first_seq: 0}  # seq id -> its place among the request's
        # seq id -> its place in the grammar (structured outputs)
        self.matchers: dict[int, GrammarMatcher] = {first_seq: grammar.matcher()} if grammar else {}
        self.prompt_recorded = 0  # prompt positions whose logprobs are computed
        self._slots: dict[int, tuple[int, int]] = {}  # seq -> (first slot, number)
        self._drafts: dict[int, list[int]] = {}  # seq -> its draft tokens this step

    def schedule(self, batch, plan, i, row, num_samples):
        seq = int(plan.seq_ids[i])
        if self.params.prompt_logprobs is not None and seq == self.first_seq:
            self._add_prompt_target(batch, plan, i)
        drafts, out, index = int(plan.num_draft[i]), self.outputs.get(seq), self.index.get(seq)
        if drafts:
            # A slot per draft token and one after them, each sampling as if
            # the drafts before it were accepted.
            start = int(plan.query_start_loc[i]) + 1
            draft = self._drafts[seq] = plan.input_ids[start : start + drafts].tolist()
            self._slots[seq] = (len(batch.slots), drafts + 1)
            batch.slots += [
                self._slot(seq, out + draft[:j], index, row + j) for j in range(drafts + 1)
            ]
        elif num_samples:  # (several: the first tokens of n sequences)
            self._slots[seq] = (len(batch.slots), num_samples)
            batch.slots += [self._slot(seq, out, index + s, row) for s in range(num_samples)]

    def _slot(self, seq: int, history: list[int], index: int, row: int) -> SampleSlot:
        """The draw of the token after `history` in sequence number `index` of
        the request, from logit row `row`."""
        return SampleSlot(
            self.params,
            history,
            self.prompt_ids,
            self._generator(index, len(history)),
            self.eos_token_id,
            row,
            seq,
            self.matchers.get(seq),
        )

    def _generator(self, index: int, position: int) -> torch.Generator | None:
        """A seeded request's draw for the token at `position` of its
        sequence number `index`: a function of the seed and of these alone, so
        that neither the batch nor speculation changes what it samples."""
        if self.params.seed is None:
            return None
        key = self.params.seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + position
        return torch.Generator().manual_seed(key % (1 << 63))

    def _add_prompt_target(self, batch: SamplingBatch, plan, i: int) -> None:
        start, end = int(plan.query_start_loc[i]), int(plan.query_start_loc[i + 1])
        pos = plan.positions[start:end]
        keep = (pos < len(self.prompt_ids) - 1) & (pos >= self.prompt_recorded)
        if keep.any():
            pos = pos[keep]
            rows = np.arange(start, end, dtype=np.int32)[keep]
            targets = [self.prompt_ids[p + 1] for p in pos.tolist()]
            batch.prompt_targets.append(
                PromptLogprobTarget(self.request_id, rows, targets, self.params.prompt_logprobs)
            )
            self.prompt_recorded = int(pos[-1]) + 1

    def choose(self, output):
        chosen = {seq: output.tokens[s : s + k].tolist() for seq, (s, k) in self._slots.items()}
        self._slots.clear()
        for seq, draft in self._drafts.items():
            # Each slot drew from the target model given the drafts before it,
            # so a draft token is accepted exactly when its slot drew it (for a
            # proposer that proposes one token, the rejection-sampling rule).
            tokens = chosen[seq]
            accepted = 0
            while accepted < len(draft) and tokens[accepted] == draft[accepted]:
                accepted += 1
            chosen[seq] = tokens[: accepted + 1]
        self._drafts.clear()
        return chosen

    def mirror(self, event):
        if event.kind == _core.EventKind.APPENDED:
            self.outputs[event.seq_id].append(event.token)
            if event.seq_id in self.matchers:
                self.matchers[event.seq_id].consume(event.token)
        elif event.kind == _core.EventKind.FORKED:
            self.outputs[event.seq_id] = list(self.outputs[event.parent])
            self.index[event.seq_id] = len(self.index)
            if event.parent in self.matchers:
                self.matchers[event.seq_id] = self.matchers[event.parent].fork()


class BeamSearchStrategy(RequestStrategy):
    """Beam search: each step keeps the best continuations over all beams;
    continuing beams fork their parent's blocks in the core, dropped ones free theirs."""

    streams_tokens = False

    def __init__(self, request_id: int, first_seq: int, params: BeamSearchParams, eos: set[int]):
        self.request_id = request_id
        self.first_seq = first_seq
        self.params = params
        self.eos = eos
        self.restart()

    def restart(self):
        self.state = BeamSearchState(self.params, self.eos, self.first_seq)
        self._rows: dict[int, int] = {}  # seq id -> index among the batch's logprob rows
        self._children: dict[int, list[int]] = {}

    def schedule(self, batch, plan, i, row, num_samples):
        if num_samples:
            self._rows[int(plan.seq_ids[i])] = len(batch.logprob_rows)
            batch.logprob_rows.append(row)

    def choose(self, output):
        order = [self._rows[b.seq_id] for b in self.state.beams]
        self._rows.clear()
        selection = self.state.step(output.row_logprobs[order])
        return {b.seq_id: selection.continuations.get(b.seq_id, []) for b in self.state.beams}

    def mirror(self, event):
        if event.kind == _core.EventKind.FORKED:
            self._children.setdefault(event.parent, []).append(event.seq_id)

    def end_step(self):
        if self.state.done:
            found = self.state.results()
            reasons = [
                "stop" if h.tokens and h.tokens[-1] in self.state.eos else "length" for h in found
            ]
            return [BeamSearchFinished(self.request_id, found, reasons)]
        ids = {}
        for b in self.state.beams:
            ids[(b.seq_id, 0)] = b.seq_id
            for n, child in enumerate(self._children.get(b.seq_id, []), start=1):
                ids[(b.seq_id, n)] = child
        self._children.clear()
        self.state.commit(ids)
        return []

    @property
    def done(self) -> bool:
        return self.state.done
