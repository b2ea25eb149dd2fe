"""What one step asks of the model runner, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.outputs import Logprob
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output import GrammarMatcher


@dataclass
class StepInputs:
    """What a forward needs: the scheduler's flat arrays (on rank 0) or their
    broadcast (on the other tensor-parallel ranks)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    block_tables: np.ndarray  # [num_seqs, max_blocks]
    copies: np.ndarray  # [num_copies, 2]
    rows: np.ndarray  # token rows whose logits the step needs
    num_decode_seqs: int = 0  # the first sequences decode (a token, perhaps drafts)

    @classmethod
    def from_plan(cls, plan, rows) -> StepInputs:
        """From a _core.SchedulerOutput and the logit rows wanted."""
        copies = np.asarray(plan.block_copies, dtype=np.int32).reshape(-1, 2)
        return cls(
            plan.input_ids,
            plan.positions,
            plan.slot_mapping,
            plan.seq_lens,
            plan.query_start_loc,
            plan.block_tables,
            copies,
            np.asarray(rows, dtype=np.int32),
            plan.num_decode_seqs,
        )

    @property
    def block_copies(self) -> list[tuple[int, int]]:
        return [tuple(c) for c in self.copies.tolist()]


@dataclass
class SampleSlot:
    """One token to draw from logit row `row`, for a sequence with `output_ids` so far."""

    params: SamplingParams
    output_ids: list[int]
    prompt_ids: list[int]
    generator: torch.Generator | None
    eos_token_id: int | None
    row: int = 0
    seq_id: int = -1
    matcher: GrammarMatcher | None = None  # structured outputs: the sequence's grammar state


@dataclass
class PromptLogprobTarget:
    """Prompt tokens whose logprobs a step computes: token rows, the next prompt token of each, top-k."""

    request_id: int
    rows: np.ndarray
    next_tokens: list[int]
    k: int


@dataclass
class SamplingBatch:
    """What to take from a step's logits. Slots and logprob_rows index the
    plan's sample rows (the last token row of each sampled sequence)."""

    sample_rows: np.ndarray
    slots: list[SampleSlot] = field(default_factory=list)
    logprob_rows: list[int] = field(default_factory=list)  # full log-softmax wanted (beam search)
    prompt_targets: list[PromptLogprobTarget] = field(default_factory=list)

    @property
    def rows(self) -> np.ndarray:
        """The token rows whose logits the step computes: the sample rows, then the prompt targets'."""
        if not self.prompt_targets:
            return self.sample_rows
        return np.concatenate([self.sample_rows, *(t.rows for t in self.prompt_targets)])


@dataclass
class RunnerOutput:
    """A step's results: one token per slot, logprobs where asked."""

    tokens: np.ndarray  # int32 [num_slots]
    sampled_logprobs: list[float] | None = None  # per slot, where any slot asked
    top_logprobs: list[dict[int, Logprob] | None] | None = None
    row_logprobs: torch.Tensor | None = None  # float32 [len(logprob_rows), vocab], on the CPU
    prompt_logprobs: list[list[dict[int, Logprob]]] = field(default_factory=list)  # per target
