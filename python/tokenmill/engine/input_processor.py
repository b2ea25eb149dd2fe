"""Turns prompts and parameters into EngineRequests, refusing what can never run."""

from __future__ import annotations

import itertools

from tokenmill import _core
from tokenmill.engine.core import EngineRequest
from tokenmill.engine.strategies import BeamSearchStrategy, SamplingStrategy
from tokenmill.errors import InvalidParameterError, PromptTooLongError
from tokenmill.loader.hf import sampling_defaults
from tokenmill.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.structured_output import GrammarCompiler

PromptType = str | list[int] | dict


class InputProcessor:
    def __init__(self, tokenizer, generation_config: dict, hf_config, max_model_len: int, args):
        self.tokenizer = tokenizer
        self.vocab_size = hf_config.vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = args.max_num_seqs
        self.max_logprobs = args.max_logprobs
        self.eos_token_id, self.extra_stop_ids = _eos_ids(generation_config, hf_config, tokenizer)
        stop_ids = [t for t in [self.eos_token_id, *self.extra_stop_ids] if t is not None]
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, stop_ids)
        # what a request leaves unset takes the model's generation config (--generation-config)
        self.sampling_defaults = (
            sampling_defaults(generation_config) if args.generation_config == "auto" else {}
        )
        self._ids = itertools.count()

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text if any, token ids) of a string, a list of ids or a
        {"prompt": ...} / {"prompt_token_ids": ...} dict."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return None, list(prompt)
        raise InvalidParameterError(
            "prompt", "prompt must be a string, a list of token ids or a dict"
        )

    def sampling_request(
        self, ids: list[int], params: SamplingParams, priority: int = 0
    ) -> EngineRequest:
        self._validate(ids, params)
        spec = params.structured_outputs
        # Compiled already where the caller awaited it (the server), else here.
        grammar = self.grammars.compile(spec).result() if spec is not None else None
        rid = next(self._ids)
        max_tokens = (
            params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        )
        core = _core.RequestParams()
        core.max_tokens = max(1, max_tokens)
        core.min_tokens = min(params.min_tokens, core.max_tokens)
        core.n = params.num_sequences
        core.stop_token_ids = list(params.stop_token_ids) + (
            [] if params.ignore_eos else self.extra_stop_ids
        )
        core.eos_token_id = -1 if self.eos_token_id is None else self.eos_token_id
        core.ignore_eos = params.ignore_eos
        core.priority = priority
        core.speculate = grammar is None  # a grammar's state would follow each draft
        if params.prompt_logprobs is not None:
            # Cached prompt blocks would skip the forward that yields their logprobs.
            core.cache_salt = (1 << 63) | rid
        eos = self.eos_token_id
        return EngineRequest(
            rid, ids, core, lambda seq: SamplingStrategy(rid, seq, ids, params, eos, grammar)
        )

    def beam_request(self, ids: list[int], params: BeamSearchParams) -> EngineRequest:
        self._validate(ids, SamplingParams(n=params.beam_width, max_tokens=params.max_tokens))
        rid = next(self._ids)
        core = _core.RequestParams()
        core.max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        core.n = params.beam_width
        core.ignore_eos = True  # EOS ends hypotheses here, not sequences in the core
        core.restart_on_preempt = True
        eos = {t for t in [self.eos_token_id, *self.extra_stop_ids] if t is not None}
        effective = BeamSearchParams(**{**params.__dict__, "max_tokens": core.max_tokens})
        return EngineRequest(
            rid, ids, core, lambda seq: BeamSearchStrategy(rid, seq, effective, eos)
        )

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidParameterError("prompt", "prompt must not be empty")
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(
                "prompt",
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {len(ids)} tokens",
            )
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidParameterError(
                "prompt", f"prompt token ids must be in [0, {self.vocab_size})"
            )
        ids_of = {
            "stop_token_ids": params.stop_token_ids,
            "logit_bias": list(params.logit_bias or ()),
        }
        for name, given in ids_of.items():
            bad = [t for t in given if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParameterError(
                    name, f"{name} holds token ids outside [0, {self.vocab_size}): {bad[:4]}"
                )
        if params.num_sequences > self.max_num_seqs:
            raise InvalidParameterError(
                "n", f"n must be at most {self.max_num_seqs} sequences per request"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.max_logprobs:
                raise InvalidParameterError(name, f"{name} must be at most {self.max_logprobs}")


def _eos_ids(generation_config: dict, hf_config, tokenizer) -> tuple[int | None, list[int]]:
    """The EOS id, and the other ids that end generation (generation_config lists several)."""
    ids = generation_config.get("eos_token_id", getattr(hf_config, "eos_token_id", None))
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = list(ids) if isinstance(ids, list) else ([] if ids is None else [ids])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return (ids[0] if ids else None), ids[1:]
