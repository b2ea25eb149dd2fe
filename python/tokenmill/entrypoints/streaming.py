"""Streamed responses: the requests of one call run together and their
deltas go out as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from tokenmill.entrypoints.async_engine import AsyncEngine
from tokenmill.entrypoints.chat import ChatPlan, ChoiceParser
from tokenmill.entrypoints.responses import (
    APIError,
    chat_logprobs,
    completion_logprobs,
    usage_body,
)
from tokenmill.errors import InvalidParameterError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill.server")


@dataclass
class StreamCall:
    """One streamed API call: its requests, and how its chunks are written."""

    engine: AsyncEngine
    token_text: Callable[[int], str]
    raw: Request
    rid: str
    model: str
    params: SamplingParams
    priority: int
    include_usage: bool
    chat: ChatPlan | None  # None for completions
    echo: bool = False  # completions: each choice's first chunk starts with its prompt

    async def start(self, prompts: list) -> StreamingResponse:
        """Starts every request; the first item tells whether the engine
        accepted them (an error raises here, before any byte is sent)."""
        gens = [
            self.engine.generate(f"{self.rid}-{i}", p, self.params, self.priority)
            for i, p in enumerate(prompts)
        ]
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, agen):
            try:
                async for out in agen:
                    await queue.put((i, out))
            except BaseException as e:  # noqa: BLE001  (reported to the stream)
                await queue.put((i, e))
            finally:
                await agen.aclose()
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        first = await queue.get()
        if isinstance(first[1], BaseException):
            for t in tasks:
                t.cancel()
            raise first[1]
        return StreamingResponse(
            self.events(queue, tasks, len(gens), first), media_type="text/event-stream"
        )

    def prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.engine.tokenizer.decode(out.prompt_token_ids)

    def chunk(self, created: int, choices: list, **extra) -> str:
        body = {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def events(self, queue, tasks, n_prompts: int, first) -> AsyncIterator[str]:
        created = int(time.time())
        params = self.params
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        parsers: dict[int, ChoiceParser] = {}
        finished: set[int] = set()
        done_prompts = 0
        last: dict[int, RequestOutput] = {}
        try:
            if self.chat:
                for i in range(params.n):
                    role = {"role": "assistant", "content": ""}
                    yield self.chunk(
                        created,
                        [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}],
                    )
            item = first
            while True:
                i, out = item
                if out is None:
                    done_prompts += 1
                    if done_prompts == n_prompts:
                        break
                elif isinstance(out, BaseException):
                    yield _error_event(out)
                    break
                else:
                    last[i] = out
                    for c in out.outputs:
                        key = i * params.n + c.index
                        if key in finished:
                            continue
                        start, tstart = sent_text.get(key, 0), sent_tokens.get(key, 0)
                        text, new_ids = c.text[start:], c.token_ids[tstart:]
                        choice = {"index": key, "logprobs": None, "finish_reason": c.finish_reason}
                        if self.chat:
                            # the parser takes every piece; what it holds back goes out later
                            parser = parsers.setdefault(key, self.chat.parser())
                            delta = parser.feed(text, final=bool(c.finish_reason))
                            sent_text[key] = len(c.text)
                            choice["delta"] = delta.body(self.chat.with_reasoning)
                            choice["finish_reason"] = parser.finish_reason(c.finish_reason)
                            if not choice["delta"] and not c.finish_reason:
                                continue
                        else:
                            if not text and not c.finish_reason:
                                continue
                            if self.echo and key not in sent_tokens:
                                text = self.prompt_text(out) + text
                            choice["text"] = text
                        sent_text[key], sent_tokens[key] = len(c.text), len(c.token_ids)
                        if c.logprobs is not None and params.logprobs is not None:
                            new_lp = c.logprobs[tstart:]
                            choice["logprobs"] = (
                                chat_logprobs(self.token_text, new_ids, new_lp, params.logprobs)
                                if self.chat
                                else completion_logprobs(self.token_text, new_ids, new_lp, start)
                            )
                        if c.finish_reason:
                            choice["stop_reason"] = c.stop_reason
                            finished.add(key)
                        yield self.chunk(created, [choice])
                if await self.raw.is_disconnected():
                    logger.info("client gone, aborting %s", self.rid)
                    return
                item = await queue.get()
            if self.include_usage:
                yield self.chunk(created, [], usage=usage_body(list(last.values())))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            # However the stream ended (client gone, error), unfinished requests
            # are aborted here rather than through the cancelled tasks alone.
            for i in range(n_prompts):
                if i not in last or not last[i].finished:
                    self.engine.abort(f"{self.rid}-{i}")


def _error_event(e: BaseException) -> str:
    known = e if isinstance(e, (InvalidParameterError, APIError)) else None
    message = known.message if known else f"{type(e).__name__}: {e}"
    body = {"message": message, "type": "InternalServerError", "param": None, "code": 500}
    return f"data: {json.dumps({'error': body})}\n\n"
