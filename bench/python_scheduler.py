"""A straightforward pure-Python block manager and scheduler with the native
core's policy (token budget, chunked prefill, FCFS admission, preemption of
the latest arrival by recompute). The reference for bench/scheduler.py."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Seq:
    id: int
    tokens: list[int]
    max_tokens: int
    num_prompt: int
    num_computed: int = 0
    table: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    seq_ids: list[int]
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    num_samples: list[int]


class PyScheduler:
    def __init__(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens):
        self.free = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.bs, self.max_seqs, self.budget = block_size, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []

    def add_request(self, sid, prompt, max_tokens):
        self.waiting.append(Seq(sid, list(prompt), max_tokens, len(prompt)))

    def _needed(self, seq, n):
        return max(0, -(-(seq.num_computed + n) // self.bs) - len(seq.table))

    def _allocate(self, seq, n):
        for _ in range(self._needed(seq, n)):
            b = self.free.popleft()
            self.ref[b] += 1
            seq.table.append(b)

    def _free(self, seq):
        for b in reversed(seq.table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
        seq.table = []

    def _emit(self, seq, n, out):
        out.seq_ids.append(seq.id)
        for p in range(seq.num_computed, seq.num_computed + n):
            out.input_ids.append(seq.tokens[p])
            out.positions.append(p)
            out.slot_mapping.append(seq.table[p // self.bs] * self.bs + p % self.bs)
        seq.num_computed += n
        out.query_start_loc.append(len(out.input_ids))
        out.seq_lens.append(seq.num_computed)
        out.block_tables.append(list(seq.table))
        out.num_samples.append(1 if seq.num_computed == len(seq.tokens) else 0)

    def schedule(self) -> StepOutput:
        out = StepOutput([], [], [], [], [0], [], [], [])
        budget = self.budget
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while self._needed(seq, n) > len(self.free):
                victim = self.running.pop()
                self._free(victim)
                victim.num_computed = 0
                self.waiting.appendleft(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._allocate(seq, n)
                self._emit(seq, n, out)
                budget -= n
                i += 1
                continue
            break
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if self._needed(seq, n) > len(self.free):
                break
            self.waiting.popleft()
            self._allocate(seq, n)
            self._emit(seq, n, out)
            self.running.append(seq)
            budget -= n
        width = max((len(t) for t in out.block_tables), default=0)
        out.block_tables = [t + [0] * (width - len(t)) for t in out.block_tables]
        return out

    def update(self, out: StepOutput, sampled: list[int]) -> None:
        by_id = {s.id: s for s in self.running}
        k = 0
        for sid, n in zip(out.seq_ids, out.num_samples, strict=True):
            if not n:
                continue
            seq = by_id[sid]
            seq.tokens.append(sampled[k])
            k += 1
            if len(seq.tokens) - seq.num_prompt >= seq.max_tokens:
                self._free(seq)
                self.running.remove(seq)
