"""OpenAI-compatible HTTP server (``tokenmill serve``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

from fastapi import Request

from tokenmill.entrypoints.async_engine import AsyncEngine
from tokenmill.entrypoints.chat import ChatOptions, ChatPlan, plan_chat
from tokenmill.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tokenmill.entrypoints.responses import (
    APIError,
    chat_logprobs,
    completion_logprobs,
    model_card,
    response_body,
    usage_body,
)
from tokenmill.entrypoints.streaming import StreamCall
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("tokenmill.server")

DISCONNECT_POLL_S = 0.5

# what a beam search reads of a completion request; any other field given is refused
BEAM_SEARCH_FIELDS = {
    *("model", "prompt", "n", "best_of", "max_tokens", "ignore_eos", "length_penalty"),
    *("use_beam_search", "stream", "priority", "user"),
}


class Server:
    """Routes over one AsyncEngine."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_names: list[str],
        api_key: str | None = None,
        max_n: int = 16,
        chat_options: ChatOptions | None = None,
    ):
        self.engine = engine
        self.chat_options = chat_options or ChatOptions()
        self.sampling_defaults = engine.engine.inputs.sampling_defaults
        self.log_requests = True
        self.model_names = model_names
        self.api_key = api_key
        self.max_n = max_n
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ---------------------------------------------------------------- helpers
    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(
            404,
            f"The model `{name}` does not exist. Valid models: {', '.join(self.model_names)}",
            "NotFoundError",
            "model",
        )

    def check_n(self, params: SamplingParams) -> None:
        if params.num_sequences > self.max_n:
            name = "best_of" if params.best_of else "n"
            raise APIError(
                400, f"{name} must be at most {self.max_n}, got {params.num_sequences}", param=name
            )

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    async def check_structured(self, req, params: SamplingParams, field: str | None = None):
        """Compiles the request's output constraint; `field` names its source
        where it is not the request's structured-output field."""
        if req.user is not None and self.log_requests:
            logger.info("request from user %r", req.user)
        if params.structured_outputs is not None:
            field = field or req.structured()[0]
            await self.engine.compile_constraint(params.structured_outputs, field)

    def stream(self, raw: Request, rid: str, model: str, params, req, chat=None) -> StreamCall:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamCall(
            self.engine, self.token_text, raw, rid, model, params, req.priority, include_usage, chat
        )

    async def _run(
        self, raw: Request, rid: str, prompt, params: SamplingParams, priority: int
    ) -> RequestOutput:
        """Collects a request's final output; a client that goes away (gives up
        waiting) has the request aborted within half a second."""
        agen = self.engine.generate(rid, prompt, params, priority)

        async def collect():
            final = None
            async for out in agen:
                final = out
            return final

        task = asyncio.create_task(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await raw.is_disconnected():
                    logger.info("client gone, aborting %s", rid)
                    raise asyncio.CancelledError
        finally:
            if not task.done():
                task.cancel()  # the engine's generator aborts the request as it closes
                await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, raw: Request):
        model = self.check_model(req.model)
        prompts = req.prompts()
        if req.use_beam_search:
            return await self.beam_completions(req, raw, model, prompts)
        if "length_penalty" in req.model_fields_set:
            raise APIError(400, "length_penalty needs use_beam_search", param="length_penalty")
        params = req.sampling_params(req.max_tokens, req.logprobs, self.sampling_defaults)
        await self.check_structured(req, params)
        if req.echo and req.logprobs is not None and not req.stream:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        self.check_n(params)
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        if req.stream:
            if req.echo and req.logprobs is not None:
                raise APIError(400, "echo with logprobs cannot be streamed", param="echo")
            call = self.stream(raw, rid, model, params, req)
            call.echo = req.echo
            return await call.start(prompts)
        outs = await asyncio.gather(
            *(self._run(raw, f"{rid}-{i}", p, params, req.priority) for i, p in enumerate(prompts))
        )
        choices, usage = [], usage_body(outs)
        for i, out in enumerate(outs):
            for c in out.outputs:
                text = c.text
                if req.echo:
                    text = (
                        out.prompt
                        if out.prompt is not None
                        else self.engine.tokenizer.decode(out.prompt_token_ids)
                    ) + text
                choices.append(
                    {
                        "index": i * params.n + c.index,
                        "text": text,
                        "logprobs": completion_logprobs(
                            self.token_text,
                            out.prompt_token_ids + c.token_ids,
                            (out.prompt_logprobs or []) + (c.logprobs or []),
                            0,
                        )
                        if req.echo and params.logprobs is not None
                        else completion_logprobs(self.token_text, c.token_ids, c.logprobs, 0)
                        if params.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
        return response_body(rid, "text_completion", model, choices, usage)

    async def beam_completions(
        self, req: CompletionRequest, raw: Request, model: str, prompts: list
    ):
        if req.stream:
            raise APIError(400, "beam search cannot be streamed", param="stream")
        unused = sorted(req.model_fields_set - BEAM_SEARCH_FIELDS)
        if unused:
            raise APIError(400, f"{unused[0]} does not apply to beam search", param=unused[0])
        width = req.best_of or req.n
        if req.n < 1 or width < req.n:
            raise APIError(400, f"best_of must be at least n ({req.n})", param="best_of")
        if width > self.max_n:
            raise APIError(
                400, f"beam width must be at most {self.max_n}, got {width}", param="best_of"
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else self.engine.max_model_len
        params = BeamSearchParams(
            width, max_tokens, ignore_eos=req.ignore_eos, length_penalty=req.length_penalty
        )
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        outs = await asyncio.gather(
            *(self._run(raw, f"{rid}-{i}", p, params, req.priority) for i, p in enumerate(prompts))
        )
        choices = []
        for i, out in enumerate(outs):
            for j, c in enumerate(out.outputs[: req.n]):
                choices.append(
                    {
                        "index": i * req.n + j,
                        "text": c.text,
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": None,
                    }
                )
        usage = usage_body(
            [
                RequestOutput(o.request_id, o.prompt, o.prompt_token_ids, o.outputs[: req.n], True)
                for o in outs
            ]
        )
        return response_body(rid, "text_completion", model, choices, usage)

    # ------------------------------------------------------------------ chat
    def chat_plan(self, req: ChatCompletionRequest) -> ChatPlan:
        template = req.chat_template or getattr(self.engine.tokenizer, "chat_template", None)
        return plan_chat(req, self.chat_options, template if isinstance(template, str) else None)

    def chat_prompt(self, req: ChatCompletionRequest, plan: ChatPlan) -> list[int]:
        try:
            ids = self.engine.tokenizer.apply_chat_template(
                plan.messages,
                chat_template=req.chat_template,
                add_generation_prompt=req.add_generation_prompt,
                tokenize=True,
                **plan.template_kwargs,
            )
        except Exception as e:  # template errors are the caller's input
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        model = self.check_model(req.model)
        top = req.top_logprobs if req.logprobs else None
        if req.logprobs and top is None:
            top = 0
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        plan = self.chat_plan(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = req.sampling_params(max_tokens, top, self.sampling_defaults)
        if plan.constraint is not None:
            params = dataclasses.replace(params, structured_outputs=plan.constraint)
        if plan.raw_text:
            params = dataclasses.replace(params, skip_special_tokens=False)
        await self.check_structured(req, params, "tools" if plan.constraint else None)
        self.check_n(params)
        prompt = {"prompt_token_ids": self.chat_prompt(req, plan)}
        rid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        if req.stream:
            return await self.stream(raw, rid, model, params, req, plan).start([prompt])
        out = await self._run(raw, rid, prompt, params, req.priority)
        choices = []
        for c in out.outputs:
            parser = plan.parser()
            choices.append(
                {
                    "index": c.index,
                    "message": parser.message(c.text, plan.with_reasoning),
                    "logprobs": chat_logprobs(self.token_text, c.token_ids, c.logprobs, top or 0)
                    if req.logprobs
                    else None,
                    "finish_reason": parser.finish_reason(c.finish_reason),
                    "stop_reason": c.stop_reason,
                }
            )
        return response_body(rid, "chat.completion", model, choices, usage_body([out]))

    # ------------------------------------------------------------ tokenizer
    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        tok = self.engine.tokenizer
        if req.messages == []:
            raise APIError(400, "messages must not be empty", param="messages")
        if req.messages is not None:
            chat = ChatCompletionRequest(
                messages=req.messages, add_generation_prompt=req.add_generation_prompt
            )
            ids = self.chat_prompt(chat, self.chat_plan(chat))
        elif req.prompt is not None:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        else:
            raise APIError(400, "either prompt or messages must be given", param="prompt")
        return {
            "count": len(ids),
            "max_model_len": self.engine.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        vocab = len(self.engine.tokenizer)
        if any(
            t < 0 or t >= max(vocab, self.engine.engine.hf_config.vocab_size) for t in req.tokens
        ):
            raise APIError(400, "token ids out of the vocabulary", param="tokens")
        return {"prompt": self.engine.tokenizer.decode(req.tokens)}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(n) for n in self.model_names]}

    def model_card(self, name: str) -> dict:
        return model_card(name, self.created, self.engine.max_model_len)
