"""Structured outputs: constraints compiled to grammars, and per-sequence
matchers that give each step a mask of the tokens allowed next.

xgrammar computes a mask in about 10 us a token over the default model's
vocabulary, a tenth of llguidance's, for a compile a few milliseconds
longer (bench/structured.py --backends). Grammars compile on a worker
thread, cached by constraint, so a request waits for its grammar without
holding up the step loop.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import StructuredOutputsParams

# Compact JSON, as json.dumps writes it: a small model given free whitespace
# can spend its whole budget on it.
JSON_SEPARATORS = (", ", ": ")
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[time] file:line: "


class StructuredOutputError(InvalidParameterError):
    """A constraint that cannot compile (a bad schema, regex or grammar)."""


class Grammar:
    """A compiled constraint; matchers start from it."""

    def __init__(self, compiled):
        self.compiled = compiled

    def matcher(self) -> GrammarMatcher:
        import xgrammar

        vocab = self.compiled.tokenizer_info.vocab_size
        return GrammarMatcher(xgrammar.GrammarMatcher(self.compiled), vocab)


class GrammarMatcher:
    """Where one sequence is in its grammar: the tokens it may take next."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fork(self) -> GrammarMatcher:
        return GrammarMatcher(self.matcher.fork(), self.vocab_size)

    def consume(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


class GrammarCompiler:
    """Compiles constraints for one tokenizer on a worker thread, caching
    each grammar by its constraint. stop_ids end a sequence once its grammar
    is complete (the EOS ids the engine stops on)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Future] = {}
        self._compiler = None

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """A future of the constraint's Grammar; it raises StructuredOutputError
        when the constraint cannot compile."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is None:
                future = self._cache[spec.key] = self._pool.submit(self._compile, spec)
            return future

    def _compile(self, spec: StructuredOutputsParams) -> Grammar:
        field = f"structured_outputs.{spec.kind}"
        compiler = self._xgrammar_compiler()
        try:
            if spec.kind in ("json", "json_object"):
                schema = spec.json if spec.kind == "json" else {"type": "object"}
                compiled = compiler.compile_json_schema(
                    json.dumps(bounded_strings_as_patterns(schema)),
                    any_whitespace=False,
                    separators=JSON_SEPARATORS,
                )
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.regex)
            elif spec.kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(spec.choice))
            elif spec.kind == "structural_tag":
                tag = bounded_strings_as_patterns(spec.structural_tag)
                compiled = compiler.compile_structural_tag(json.dumps(tag))
            else:
                if "::=" not in spec.grammar:
                    raise ValueError("grammars are EBNF (GBNF): rules written `name ::= ...`")
                compiled = compiler.compile_grammar(spec.grammar)
        except Exception as e:  # xgrammar raises RuntimeError, ValueError and its own types
            reason = _LOG_PREFIX.sub("", str(e)).strip()
            raise StructuredOutputError(field, f"{field} cannot be compiled: {reason}") from e
        return Grammar(compiled)

    def _xgrammar_compiler(self):
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                _transformers_tokenizer(self.tokenizer),
                vocab_size=self.vocab_size,
                stop_token_ids=self.stop_ids,
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler


def bounded_strings_as_patterns(schema):
    """The schema with each string's minLength/maxLength written as a pattern.

    xgrammar (0.2.9) turns a length-bounded string into a repetition of any
    character but a quote, a backslash, CR and LF: raw control characters
    pass (invalid JSON, which a model with byte tokens writes) and escapes do
    not; its pattern path excludes control characters. The pattern keeps the bounds, in characters, so
    outputs still validate against the original schema."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not out.keys() & {"pattern", "format"}:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^[\\s\\S]{{{low},{high}}}$"
    return out


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of the strings."""

    def literal(text: str) -> str:
        escaped = "".join(
            f"\\x{ord(c):02x}" if ord(c) < 0x20 else ("\\" + c if c in '"\\' else c) for c in text
        )
        return f'"{escaped}"'

    return "root ::= " + " | ".join(literal(c) for c in choices)


def _transformers_tokenizer(tokenizer):
    """xgrammar reads a transformers tokenizer; tokenmill's light wrapper
    hands over its `tokenizers` object."""
    from tokenmill.loader.tokenizer import FastTokenizer

    if not isinstance(tokenizer, FastTokenizer):
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token
    )


def fill_bitmask(slots) -> torch.Tensor | None:
    """int32 [len(slots), ceil(vocab / 32)]: bit t of row i set where slot i's
    grammar allows token t next (all set for unconstrained slots); None when
    no slot is constrained. Slots of one sequence share their matcher's row."""
    import xgrammar

    rows = [i for i, s in enumerate(slots) if s.matcher is not None]
    if not rows:
        return None
    bitmask = xgrammar.allocate_token_bitmask(len(slots), slots[rows[0]].matcher.vocab_size)
    first: dict[int, int] = {}
    for i in rows:
        matcher = slots[i].matcher
        j = first.setdefault(id(matcher), i)
        if j == i:
            matcher.matcher.fill_next_token_bitmask(bitmask, i)
        else:
            bitmask[i] = bitmask[j]
    return bitmask


def allowed(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [vocab] of one bitmask row."""
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab_size].astype(bool))
