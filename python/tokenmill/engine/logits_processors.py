"""Per-row logits processors: each edits the float32 logits of the slots it applies to.

A new constraint (a token mask, a bias) is one more entry in DEFAULT_PROCESSORS
or in a runner's list, not a branch in the sampler."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

import tokenmill.ops  # noqa: F401  (registers torch.ops.tokenmill)
from tokenmill.engine.batch import SampleSlot
from tokenmill.structured_output import allowed, fill_bitmask


class LogitsProcessor:
    def prepare(self, slots: list[SampleSlot]) -> None:
        """Called with a step's slots before its forward pass runs."""

    def applies(self, slot: SampleSlot) -> bool:
        """Whether this processor changes the slot's row (False keeps greedy rows on the fast path)."""
        raise NotImplementedError

    def __call__(self, row: torch.Tensor, slot: SampleSlot) -> None:
        """Edits one row of logits in place."""
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, rows: list[int], slots: list[SampleSlot]) -> None:
        """Edits logits[i] for each i in rows (those of slots it applies to)."""
        for i in rows:
            self(logits[i], slots[i])


class LogitBias(LogitsProcessor):
    def applies(self, slot):
        return bool(slot.params.logit_bias)

    def __call__(self, row, slot):
        bias = slot.params.logit_bias
        ids = torch.tensor(list(bias), dtype=torch.long, device=row.device)
        ids = ids[ids < row.numel()]
        row[ids] += torch.tensor([bias[int(t)] for t in ids], device=row.device)


class MinTokens(LogitsProcessor):
    """Bans the stop ids (and EOS) until min_tokens are generated."""

    def applies(self, slot):
        return len(slot.output_ids) < slot.params.min_tokens

    def __call__(self, row, slot):
        banned = list(slot.params.stop_token_ids)
        if slot.eos_token_id is not None and not slot.params.ignore_eos:
            banned.append(slot.eos_token_id)
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")


class RepetitionPenalty(LogitsProcessor):
    def applies(self, slot):
        return slot.params.repetition_penalty != 1.0

    def __call__(self, row, slot):
        p = slot.params.repetition_penalty
        seen = sorted(set(slot.prompt_ids) | set(slot.output_ids))
        seen = torch.tensor(seen, dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p, vals * p)


class PresenceFrequencyPenalty(LogitsProcessor):
    def applies(self, slot):
        p = slot.params
        return bool((p.presence_penalty or p.frequency_penalty) and slot.output_ids)

    def __call__(self, row, slot):
        p = slot.params
        out = torch.tensor(slot.output_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=row.numel()).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


class GrammarMask(LogitsProcessor):
    """Structured outputs: only the tokens the sequence's grammar allows. The
    step's bitmask is filled on a worker thread while the forward pass runs,
    and applied to every constrained row at once."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-masks")
        self._pending: Future | None = None

    def prepare(self, slots):
        constrained = any(s.matcher is not None for s in slots)
        self._pending = self._pool.submit(fill_bitmask, slots) if constrained else None

    def applies(self, slot):
        return slot.matcher is not None

    def apply(self, logits, rows, slots):
        bitmask = self._pending.result().to(logits.device)
        self._pending = None
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        torch.ops.tokenmill.apply_token_bitmask(logits, bitmask, index)
        for i in rows:  # what the grammar allows outranks min_tokens' bans
            if len(slots[i].output_ids) < slots[i].params.min_tokens:
                if not torch.isfinite(logits[i]).any():
                    keep = allowed(bitmask[i].cpu(), logits.shape[1]).to(logits.device)
                    logits[i].masked_fill_(keep, 0.0)

    def __call__(self, row, slot):
        raise NotImplementedError("GrammarMask edits whole batches (apply)")


DEFAULT_PROCESSORS = (LogitBias(), MinTokens(), RepetitionPenalty(), PresenceFrequencyPenalty())


def default_processors() -> tuple[LogitsProcessor, ...]:
    """A sampler's processors: the stateless defaults, then its own grammar masks."""
    return (*DEFAULT_PROCESSORS, GrammarMask())
