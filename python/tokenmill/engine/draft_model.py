"""Draft-model speculation: a small model with the target's tokenizer proposes
each decoding sequence's draft tokens, greedily, over its own KV cache laid out
in the target's blocks (same block ids, same slots)."""

from __future__ import annotations

import statistics
import time
from collections import deque

import numpy as np
import torch

from tokenmill.engine.batch import StepInputs
from tokenmill.engine.model_runner import ModelRunner


class DraftModelProposer:
    """Fills the draft rows the scheduler reserved (DraftMethod.MODEL).

    The draft model's cache is not written as the target's is: its tokens are
    computed lazily, when a sequence next drafts, from the first position whose
    draft KV is not known to hold the sequence's token. Rejected drafts' KV is
    overwritten then. A stale draft cache only lowers acceptance: the target
    verifies every draft token."""

    def __init__(self, runner: ModelRunner, block_size: int):
        self.runner = runner
        self.block_size = block_size
        # seq -> positions [0, n) of its draft KV that hold its tokens, where n
        # is the sequence's next position (drafts written past it are trimmed
        # once the next step shows how many were accepted)
        self._valid: dict[int, int] = {}
        self._forward_ms: deque[float] = deque(maxlen=15)  # recent draft forwards
        self._time_a_forward()

    @torch.inference_mode()
    def _time_a_forward(self) -> None:
        """Prices a draft forward before any step: priced as free, every sequence
        would draft once (and compute its prompt on the draft) whatever the batch."""
        step = StepInputs(
            input_ids=np.zeros(1, dtype=np.int32),
            positions=np.zeros(1, dtype=np.int32),
            slot_mapping=np.full(1, -1, dtype=np.int32),  # writes no cache slot
            seq_lens=np.ones(1, dtype=np.int32),
            query_start_loc=np.array([0, 1], dtype=np.int32),
            block_tables=np.zeros((1, 1), dtype=np.int32),
            copies=np.zeros((0, 2), dtype=np.int32),
            rows=np.zeros(1, dtype=np.int32),
            num_decode_seqs=1,
        )
        for i in range(8):
            t0 = time.perf_counter()
            self.runner.argmax_tokens(self.runner.hidden_states(step))
            if i >= 3:  # after the first shapes' set-up
                self._forward_ms.append((time.perf_counter() - t0) * 1e3)

    @torch.inference_mode()
    def propose(self, plan, scheduler) -> None:
        """Writes draft tokens into `plan.input_ids`' reserved rows and hands
        them to the scheduler; sequences that do not decode now are forgotten."""
        self.runner.copy_blocks(plan.block_copies)  # the target's copy-on-write, in the draft's
        valid, drafting = {}, []
        starts, lens = plan.query_start_loc, plan.num_draft
        for i in range(plan.num_decode_seqs):
            seq, k, start = int(plan.seq_ids[i]), int(lens[i]), int(starts[i])
            n = int(plan.positions[start])
            known = min(self._valid.get(seq, 0), n)
            # Drafting writes positions n .. n + k - 1: its token, drafts 1 .. k - 1.
            valid[seq] = n + k if k else known
            if k:
                tokens = (
                    plan.input_ids[start : start + 1]
                    if known == n
                    else np.asarray(scheduler.seq_tokens(seq)[known : n + 1], dtype=np.int32)
                )
                drafting.append((i, known, n, k, tokens))
        self._valid = valid
        if not drafting:
            return
        depth = max(d[3] for d in drafting)
        # Forward 1 computes what each sequence's draft KV lacks, up to its
        # next token; forward j then feeds draft j - 1 of the sequences with j.
        feeds = [(i, np.arange(known, n + 1), tokens) for i, known, n, _, tokens in drafting]
        for j in range(1, depth + 1):
            drafts = self._forward(plan, feeds)
            feeds = []
            for (i, _, n, k, _), token in zip(
                (d for d in drafting if d[3] >= j), drafts, strict=True
            ):
                plan.input_ids[int(starts[i + 1]) - k + j - 1] = token
                if j < k:
                    feeds.append((i, np.array([n + j]), np.array([token], dtype=np.int32)))
        scheduler.set_drafts(plan)
        scheduler.set_draft_forward_ms(self.forward_ms)

    @property
    def forward_ms(self) -> float:
        """What a draft forward costs: the median of recent ones."""
        return statistics.median(self._forward_ms)

    def _forward(self, plan, feeds) -> np.ndarray:
        """Greedy next tokens after each (plan row, positions, tokens) feed."""
        # Short feeds (a token or two: steady decoding) first, as decode rows;
        # a long catch-up after them runs as a prompt chunk.
        order = sorted(range(len(feeds)), key=lambda f: len(feeds[f][1]) > 2)
        num_decode = sum(len(f[1]) <= 2 for f in feeds)
        tables = plan.block_tables[[feeds[f][0] for f in order]]
        positions = np.concatenate([feeds[f][1] for f in order]).astype(np.int32)
        row_of = np.repeat(np.arange(len(order)), [len(feeds[f][1]) for f in order])
        slots = tables[row_of, positions // self.block_size] * self.block_size
        ends = np.cumsum([len(feeds[f][1]) for f in order]).astype(np.int32)
        t0 = time.perf_counter()
        step = StepInputs(
            input_ids=np.concatenate([feeds[f][2] for f in order]).astype(np.int32),
            positions=positions,
            slot_mapping=(slots + positions % self.block_size).astype(np.int32),
            seq_lens=np.array([feeds[f][1][-1] + 1 for f in order], dtype=np.int32),
            query_start_loc=np.concatenate([[0], ends]).astype(np.int32),
            block_tables=np.ascontiguousarray(tables),
            copies=np.zeros((0, 2), dtype=np.int32),
            rows=ends - 1,
            num_decode_seqs=num_decode,
        )
        hidden = self.runner.hidden_states(step)
        tokens = self.runner.argmax_tokens(hidden)
        if tokens is None:
            logits = self.runner.model.compute_logits(hidden)
            tokens = logits.argmax(-1).cpu().numpy().astype(np.int32)
        if num_decode == len(feeds):
            # Forwards of a token or two per sequence are what a further draft
            # position costs; catch-ups are a sequence's one-off, as a prompt is.
            self._forward_ms.append((time.perf_counter() - t0) * 1e3)
        back = np.empty_like(tokens)
        back[order] = tokens
        return back
