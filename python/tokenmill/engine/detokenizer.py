"""Incremental detokenization and stop strings for one sequence."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is decoded from a short window of earlier tokens so that tokenizers
    which merge spaces or bytes across tokens give the same text as decoding
    the whole sequence; a delta ending in an incomplete UTF-8 character is
    held back until the character completes.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Adds one token; returns the new text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


class StopChecker:
    """Finds stop strings in generated text, holding back what could still be
    the start of one so that a stop string never reaches a stream."""

    def __init__(self, stop: list[str], include_stop: bool):
        self.stop = stop
        self.include = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def check(self, text: str, new_chars: int) -> tuple[str | None, int]:
        """Returns (matched stop string or None, length of text that may be emitted)."""
        if not self.stop:
            return None, len(text)
        window_start = max(0, len(text) - new_chars - self.hold)
        best = None
        for s in self.stop:
            i = text.find(s, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            return s, i + len(s) if self.include else i
        return None, max(0, len(text) - self.hold)
