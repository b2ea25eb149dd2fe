"""Beam search over the native core's copy-on-write sequences.

The selection follows transformers' beam search: each step keeps the
2 x beam_width best continuations over all beams, finishes those among the
first beam_width that end in EOS (or reach max_tokens), scored as
sum(logprobs) / generated_length ** length_penalty, and continues with the
beam_width best that did not finish. Continuing beams fork their parent's
blocks in the core; dropped beams free theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.sampling_params import BeamSearchParams


@dataclass
class Beam:
    seq_id: int
    tokens: list[int]
    score: float  # sum of the tokens' log-probabilities


@dataclass
class Hypothesis:
    tokens: list[int]
    logprob: float
    score: float


@dataclass
class Selection:
    """What one step decided for the core: per parent sequence, the tokens that continue it."""

    continuations: dict[int, list[int]] = field(default_factory=dict)


class BeamSearchState:
    def __init__(self, params: BeamSearchParams, eos_token_ids: set[int], first_seq_id: int):
        self.params = params
        self.eos = set() if params.ignore_eos else eos_token_ids
        self.beams = [Beam(first_seq_id, [], 0.0)]
        self.finished: list[Hypothesis] = []
        self.done = False
        self.generated = 0
        self._next: list = []  # (parent beam, token, score) chosen by the last step()
        self._stop_heuristic = False

    def _length_score(self, logprob: float, length: int) -> float:
        return logprob / (length**self.params.length_penalty)

    def step(self, logprobs: torch.Tensor) -> Selection:
        """logprobs: [len(self.beams), vocab] log-softmax rows, one per live beam in order."""
        k = self.params.beam_width
        vocab = logprobs.shape[-1]
        scores = logprobs.float() + torch.tensor([b.score for b in self.beams])[:, None]
        flat = scores.reshape(-1)
        keep = min(max(2, 1 + len(self.eos)) * k, flat.numel())
        top_scores, top_idx = flat.topk(keep)
        self.generated += 1
        at_max = self.generated >= self.params.max_tokens
        candidates = []
        for rank, (s, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist(), strict=True)):
            parent, token = divmod(idx, vocab)
            stops = at_max or token in self.eos
            candidates.append((rank, s, self.beams[parent], token, stops))

        can_finish = not self._heuristic_satisfied() and not (
            self.params.early_stopping is True and len(self.finished) >= k
        )
        if can_finish:
            for rank, s, beam, token, stops in candidates:
                if stops and rank < k:
                    self.finished.append(
                        Hypothesis(beam.tokens + [token], s, self._length_score(s, self.generated))
                    )
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[k:]

        running = [c for c in candidates if not c[4]][:k]
        selection = Selection()
        new_beams = []
        for _, s, beam, token, _ in running:
            selection.continuations.setdefault(beam.seq_id, []).append(token)
            new_beams.append((beam, token, s))
        self._next = new_beams
        self.done = (
            at_max
            or not running
            or (self.params.early_stopping is True and len(self.finished) >= k)
        )
        if not self.done and self._heuristic_satisfied_after(running):
            self.done = True
        return selection

    def commit(self, child_ids: dict[tuple[int, int], int]) -> None:
        """Installs the beams chosen by step(); child_ids maps (parent, nth use) to the sequence that holds it."""
        uses: dict[int, int] = {}
        beams = []
        for parent, token, s in self._next:
            n = uses.get(parent.seq_id, 0)
            uses[parent.seq_id] = n + 1
            seq_id = child_ids[(parent.seq_id, n)]
            beams.append(Beam(seq_id, parent.tokens + [token], s))
        self.beams = beams

    def _heuristic_satisfied(self) -> bool:
        return self._stop_heuristic

    def _heuristic_satisfied_after(self, running) -> bool:
        """transformers' early-stop heuristic: all slots finished and no running beam can still beat the worst."""
        k = self.params.beam_width
        if len(self.finished) < k or not running:
            return False
        if self.params.early_stopping == "never" and self.params.length_penalty > 0:
            length = self.params.max_tokens
        else:
            length = self.generated
        best_running = running[0][1] / (length**self.params.length_penalty)
        self._stop_heuristic = best_running <= self.finished[-1].score
        return self._stop_heuristic

    def results(self) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: -h.score)
