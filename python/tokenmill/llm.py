"""The offline Python API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from tokenmill.config import EngineArgs
from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.errors import InvalidParameterError
from tokenmill.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """A model loaded for offline batched generation.

    Keyword arguments are the engine arguments (see ``EngineArgs``), the same
    ones ``tokenmill serve`` takes as flags.
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        return self.llm_engine

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidParameterError(
                "sampling_params", "sampling_params needs one per prompt or a single one"
            )
        return self._run([(p, sp) for p, sp in zip(prompts, params, strict=True)], use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Applies the chat template to each conversation, then generates.
        `tools` (OpenAI function tools) and `chat_template_kwargs` go to the
        template; the outputs are the model's text (the server parses calls)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        extra = dict(chat_template_kwargs or {})
        if tools is not None:
            extra["tools"] = tools
        prompts = [
            {
                "prompt_token_ids": self.apply_chat_template(
                    c, chat_template, add_generation_prompt, **extra
                )
            }
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation config applied (unless
        the engine was built with generation_config="vllm")."""
        return SamplingParams(**self.llm_engine.inputs.sampling_defaults)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = True,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt; each output lists its hypotheses, best score first."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        decode = self.llm_engine.tokenizer.decode
        results = []
        for out in self._run([(p, params) for p in prompts], use_tqdm):
            sequences = []
            for c in out.outputs:
                tokens = [*out.prompt_token_ids, *c.token_ids]
                text = decode(tokens, skip_special_tokens=True)
                sequences.append(
                    BeamSearchSequence(tokens, c.cumulative_logprob, text, c.finish_reason, c.score)
                )
            results.append(BeamSearchOutput(sequences))
        return results

    def apply_chat_template(
        self, messages, chat_template=None, add_generation_prompt=True, **template_kwargs
    ) -> list[int]:
        tok = self.llm_engine.tokenizer
        ids = tok.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            **template_kwargs,
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in requests:
                rid = str(next(self._counter))
                if isinstance(params, BeamSearchParams):
                    engine.add_beam_request(rid, prompt, params)
                else:
                    engine.add_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in ids]
