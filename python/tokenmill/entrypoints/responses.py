"""The bodies the OpenAI API returns: errors, completions, usage and logprobs."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse

import tokenmill
from tokenmill.outputs import RequestOutput


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(
    status: int, message: str, type_: str = "BadRequestError", param=None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": status}},
        status_code=status,
    )


def response_body(rid: str, obj: str, model: str, choices: list, usage: dict) -> dict:
    """The body of a non-streamed completion or chat completion."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": f"tokenmill-{tokenmill.__version__}",
    }


def usage_body(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_logprobs(token_text, token_ids, logprobs, offset: int) -> dict:
    """The completions API's logprobs object; token_text(id) gives a token's text."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs or [], strict=False):
        text = token_text(tid)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(entry[tid].logprob if entry else None)
        tops.append({token_text(t): lp.logprob for t, lp in entry.items()} if entry else None)
    return {
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": tops,
    }


def chat_logprobs(token_text, token_ids, logprobs, top_n: int) -> dict:
    """The chat API's logprobs object: the top_n alternatives of each token."""
    content = []
    for tid, entry in zip(token_ids, logprobs or [], strict=False):

        def item(t, lp):
            text = token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        top = [item(t, lp.logprob) for t, lp in top if lp.rank is not None and lp.rank <= top_n][
            :top_n
        ]
        content.append({**item(tid, entry[tid].logprob), "top_logprobs": top})
    return {"content": content}


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "tokenmill",
        "root": name,
        "parent": None,
        "max_model_len": max_model_len,
    }
