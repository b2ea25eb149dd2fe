"""OpenAI-compatible HTTP server (``tokenmill serve``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from tokenmill.entrypoints.async_engine import AsyncEngine
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
from tokenmill.errors import InvalidParameterError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("tokenmill.server")


class Server:
    """Routes over one AsyncEngine."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_names: list[str],
        api_key: str | None = None,
        max_n: int = 16,
    ):
        self.engine = engine
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

    async def check_structured(self, req, params: SamplingParams) -> None:
        if req.user is not None:
            logger.info("request from user %r", req.user)
        if params.structured_outputs is not None:
            await self.engine.compile_constraint(params.structured_outputs, req.structured()[0])

    async def _run(
        self, raw: Request, rid: str, prompt, params: SamplingParams, priority: int
    ) -> RequestOutput:
        """Collects a request's final output, aborting it if the client goes away."""
        final = None
        agen = self.engine.generate(rid, prompt, params, priority)
        try:
            async for out in agen:
                final = out
                if not out.finished and await raw.is_disconnected():
                    logger.info("client gone, aborting %s", rid)
                    raise asyncio.CancelledError
        finally:
            await agen.aclose()
        return final

    # ------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, raw: Request):
        model = self.check_model(req.model)
        prompts = req.prompts()
        if req.use_beam_search:
            return await self.beam_completions(req, raw, model, prompts)
        params = req.sampling_params(req.max_tokens, req.logprobs)
        await self.check_structured(req, params)
        if req.echo and req.logprobs is not None and not req.stream:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        self.check_n(params)
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        if req.stream:
            return await self._stream(raw, rid, model, prompts, params, req, chat=False)
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
    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [m.for_template() for m in req.messages]
        tok = self.engine.tokenizer
        try:
            ids = tok.apply_chat_template(
                messages,
                chat_template=req.chat_template,
                add_generation_prompt=req.add_generation_prompt,
                tokenize=True,
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
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens, top)
        await self.check_structured(req, params)
        self.check_n(params)
        prompt = {"prompt_token_ids": self.chat_prompt(req)}
        rid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        if req.stream:
            return await self._stream(raw, rid, model, [prompt], params, req, chat=True)
        out = await self._run(raw, rid, prompt, params, req.priority)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(self.token_text, c.token_ids, c.logprobs, top or 0)
                if req.logprobs
                else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return response_body(rid, "chat.completion", model, choices, usage_body([out]))

    # ------------------------------------------------------------- streaming
    async def _stream(self, raw: Request, rid: str, model: str, prompts, params, req, chat: bool):
        """Validates by starting every request, then streams their deltas as SSE."""
        gens = [
            self.engine.generate(f"{rid}-{i}", p, params, req.priority)
            for i, p in enumerate(prompts)
        ]
        queue: asyncio.Queue = asyncio.Queue()
        started = [asyncio.Event() for _ in gens]

        async def pump(i, agen):
            try:
                async for out in agen:
                    started[i].set()
                    await queue.put((i, out))
            except BaseException as e:  # noqa: BLE001  (reported to the stream)
                started[i].set()
                await queue.put((i, e))
            finally:
                await agen.aclose()
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        # The first item of each request tells whether the engine accepted it.
        first = await queue.get()
        if isinstance(first[1], BaseException):
            for t in tasks:
                t.cancel()
            raise first[1]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            self._sse(
                raw, rid, model, params, req, chat, queue, tasks, len(gens), first, include_usage
            ),
            media_type="text/event-stream",
        )

    async def _sse(
        self, raw, rid, model, params, req, chat, queue, tasks, n_prompts, first, include_usage
    ) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finished_choice: set[int] = set()
        done_prompts = 0
        last: dict[int, RequestOutput] = {}

        def chunk(choices, **extra):
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            if chat:
                for i in range(params.n):
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
            item = first
            while True:
                i, out = item
                if out is None:
                    done_prompts += 1
                    if done_prompts == n_prompts:
                        break
                elif isinstance(out, BaseException):
                    err = out if isinstance(out, (InvalidParameterError, APIError)) else None
                    msg = err.message if err else f"{type(out).__name__}: {out}"
                    yield f"data: {json.dumps({'error': {'message': msg, 'type': 'InternalServerError', 'param': None, 'code': 500}})}\n\n"
                    break
                else:
                    last[i] = out
                    for c in out.outputs:
                        key = i * params.n + c.index
                        if key in finished_choice:
                            continue
                        start, tstart = sent_text.get(key, 0), sent_tokens.get(key, 0)
                        delta = c.text[start:]
                        new_ids = c.token_ids[tstart:]
                        if not delta and not c.finish_reason:
                            continue
                        sent_text[key], sent_tokens[key] = len(c.text), len(c.token_ids)
                        lp = None
                        if c.logprobs is not None and params.logprobs is not None:
                            new_lp = c.logprobs[tstart:]
                            lp = (
                                chat_logprobs(self.token_text, new_ids, new_lp, params.logprobs)
                                if chat
                                else completion_logprobs(self.token_text, new_ids, new_lp, start)
                            )
                        choice = {"index": key, "logprobs": lp, "finish_reason": c.finish_reason}
                        if chat:
                            choice["delta"] = {"content": delta}
                        else:
                            choice["text"] = delta
                        if c.finish_reason:
                            choice["stop_reason"] = c.stop_reason
                            finished_choice.add(key)
                        yield chunk([choice])
                if await raw.is_disconnected():
                    logger.info("client gone, aborting %s", rid)
                    return
                item = await queue.get()
            if include_usage:
                yield chunk([], usage=usage_body(list(last.values())))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            # However the stream ended (client gone, error), unfinished requests
            # are aborted here rather than through the cancelled tasks alone.
            for i in range(n_prompts):
                if i not in last or not last[i].finished:
                    self.engine.abort(f"{rid}-{i}")

    # ------------------------------------------------------------ tokenizer
    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        tok = self.engine.tokenizer
        if req.messages is not None:
            ids = self.chat_prompt(
                ChatCompletionRequest(
                    messages=req.messages, add_generation_prompt=req.add_generation_prompt
                )
            )
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
