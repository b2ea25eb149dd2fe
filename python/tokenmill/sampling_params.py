"""Decoding parameters of a request."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from tokenmill.errors import InvalidParameterError

_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrains a request's output, as vLLM's field of the same name: exactly
    one of a JSON schema (`json`, a dict or its text), a regular expression,
    a choice among strings, a grammar (EBNF/GBNF), any JSON object
    (`json_object=True`), or an xgrammar structural tag (free text with
    tagged, schema-checked sections: how tool calls are constrained)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | None = None

    def __post_init__(self):
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise InvalidParameterError(
                "structured_outputs",
                "structured_outputs takes exactly one of json, regex, choice, grammar, "
                f"json_object and structural_tag, got {given or 'none'}",
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise InvalidParameterError("structured_outputs.json", f"not JSON: {e}") from e
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidParameterError(
                "structured_outputs.json", "a JSON schema must be an object or a boolean"
            )
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise InvalidParameterError(
                "structured_outputs.choice", "choice must be a non-empty list of non-empty strings"
            )
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidParameterError(
                    f"structured_outputs.{name}", f"{name} must be a non-empty string"
                )

    @property
    def kind(self) -> str:
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """The constraint as a hashable value: equal keys compile to one grammar."""
        value = getattr(self, self.kind)
        if isinstance(value, (dict, list, bool)):
            value = json.dumps(value, sort_keys=True)
        return self.kind, value


@dataclass
class SamplingParams:
    """How to sample the continuation of one prompt.

    Field names and meanings follow the OpenAI API and vLLM. Every field is
    checked on construction; a bad value raises InvalidParameterError naming it.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self):
        def fail(param, msg):
            raise InvalidParameterError(param, f"{param} {msg}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("n", "top_k", "min_tokens"):
            if not is_int(getattr(self, name)):
                fail(name, "must be an integer")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            if not is_num(getattr(self, name)):
                fail(name, "must be a finite number")
        if self.n < 1:
            fail("n", f"must be at least 1, got {self.n}")
        if self.best_of is not None:
            if not is_int(self.best_of) or self.best_of < self.n:
                fail("best_of", f"must be an integer >= n ({self.n}), got {self.best_of}")
        if self.temperature < 0:
            fail("temperature", f"must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            fail("top_k", f"must be -1 (disable) or at least 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            fail("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                fail(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            fail("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.max_tokens is not None and self.max_tokens > 2**31 - 1:
            fail("max_tokens", f"must be below 2**31, got {self.max_tokens}")
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            fail("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            fail("seed", "must be a 64-bit integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0 or v > 20):
                fail(name, f"must be in [0, 20], got {v}")
        if self.spaces_between_special_tokens is not True:
            # Text comes from the tokenizer's own decoding, as with Hugging Face fast tokenizers.
            fail("spaces_between_special_tokens", "other than True is not supported")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                fail("logit_bias", "must map token ids to numbers")
            if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
                fail("logit_bias", "values must be in [-100, 100]")
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                fail("structured_outputs", f"has an unknown field: {e}")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            fail("structured_outputs", "must be a StructuredOutputsParams")
        if self.structured_outputs is not None and self.ignore_eos:
            fail(
                "ignore_eos",
                "cannot be combined with structured_outputs (the grammar ends the output)",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def num_sequences(self) -> int:
        """How many sequences are generated (best_of when set, else n)."""
        return self.best_of or self.n

    @property
    def needs_logprobs(self) -> bool:
        return self.logprobs is not None or self.num_sequences > self.n


@dataclass
class BeamSearchParams:
    """Beam search over the native core's copy-on-write blocks."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise InvalidParameterError(
                "beam_width", f"beam_width must be at least 1, got {self.beam_width}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidParameterError(
                "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"
            )
