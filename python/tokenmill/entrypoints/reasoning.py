"""Reasoning models: the thinking between <think> and </think> goes to
`reasoning_content`, the rest to `content`, as the text arrives."""

from __future__ import annotations

from dataclasses import dataclass

# --reasoning-parser NAME: whether the chat template opens the thinking block
# in the prompt (the output then starts inside it and only closes it).
REASONING_PARSERS = {"deepseek_r1": True, "qwen3": False}

_BEFORE, _THINKING, _GAP, _ANSWER = range(4)


@dataclass
class ReasoningParser:
    opened_in_prompt: bool
    start: str = "<think>"
    end: str = "</think>"
    _buf: str = ""
    _state: int = _BEFORE

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) decided by the next piece of text."""
        self._buf += text
        reasoning = ""
        if self._state == _BEFORE:
            head = self._buf.lstrip()
            if head.startswith(self.start):
                self._buf, self._state = head[len(self.start) :], _THINKING
            elif self.start.startswith(head) and not final:
                return "", ""
            else:
                self._state = _THINKING if self.opened_in_prompt else _ANSWER
        if self._state == _THINKING:
            i = self._buf.find(self.end)
            if i < 0:
                keep = 0 if final else partial_tag(self._buf, self.end)
                cut = len(self._buf) - keep
                reasoning, self._buf = self._buf[:cut], self._buf[cut:]
                return reasoning, ""
            reasoning, self._buf = self._buf[:i], self._buf[i + len(self.end) :]
            self._state = _GAP
        if self._state == _GAP:  # the whitespace between the thinking and the answer
            self._buf = self._buf.lstrip()
            if not self._buf:
                return reasoning, ""
            self._state = _ANSWER
        content, self._buf = self._buf, ""
        return reasoning, content


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back
    until the next piece tells whether the tag follows)."""
    return next(
        (k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0
    )
