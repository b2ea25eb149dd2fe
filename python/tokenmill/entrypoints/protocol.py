"""Request bodies of the OpenAI API and their translation to SamplingParams."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

# vLLM's older fields for structured outputs, by the constraint each gives
GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Request(BaseModel):
    """A request body: unknown fields, NaN or infinite numbers and text that
    is not Unicode (lone surrogates, which JSON's \\u escapes can spell) are
    refused by name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data):
        _check_text(data, "")
        return data


def _check_text(value, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            where = path or "body"
            raise InvalidParameterError(where, f"{where} is not valid Unicode: {e.reason}") from e
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, path)
            _check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for v in value:
            _check_text(v, path)


class _Sampling(_Request):
    """Fields common to completions and chat. Anything else is refused by
    name (extra="forbid"): a field tokenmill would ignore is an error."""

    model: str | None = None
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # written to the request log
    priority: int = 0
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self) -> tuple[str, StructuredOutputsParams] | None:
        """The request's output constraint and the field that gave it."""
        given: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidParameterError(
                    "response_format.json_schema", "json_schema with a schema is required"
                )
            given.append(("response_format.json_schema.schema", {"json": rf.json_schema.schema_}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        for name, kind in GUIDED.items():
            if getattr(self, name) is not None:
                given.append((name, {kind: getattr(self, name)}))
        if len(given) > 1:
            raise InvalidParameterError(
                given[1][0],
                "give one of response_format, structured_outputs and guided_*, "
                f"not {given[0][0]} and {given[1][0]}",
            )
        if not given:
            return None
        field, spec = given[0]
        try:
            return field, StructuredOutputsParams(**spec)
        except TypeError as e:
            raise InvalidParameterError(field, f"{field} has an unknown field: {e}") from e

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, defaults: dict | None = None
    ) -> SamplingParams:
        """The request's parameters; what it leaves unset takes `defaults`
        (the model's generation config)."""
        defaults = defaults or {}
        kw = dict(
            {k: v for k, v in defaults.items() if k != "max_tokens"},
            n=self.n,
            best_of=self.best_of,
            max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
            min_tokens=self.min_tokens,
            seed=self.seed,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )
        structured = self.structured()
        if structured is not None:
            kw["structured_outputs"] = structured[1]
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.logit_bias:
            try:
                kw["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError as e:
                raise InvalidParameterError(
                    "logit_bias", "logit_bias keys must be token ids"
                ) from e
        if self.stream_options is not None and not self.stream:
            raise InvalidParameterError("stream_options", "stream_options needs stream=true")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise InvalidParameterError("best_of", "best_of > n cannot be streamed")
        return SamplingParams(**kw)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0

    def prompts(self) -> list:
        """The prompts as a list of strings or token id lists."""
        p = self.prompt
        if p is None or p == "" or p == []:
            raise InvalidParameterError("prompt", "prompt must be provided and non-empty")
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if any(isinstance(x, (str, list)) and len(x) == 0 for x in p):
            raise InvalidParameterError("prompt", "prompts must be non-empty")
        return [x if isinstance(x, str) else list(x) for x in p]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = "text"
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as the API returns it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message; fields beyond these (name, reasoning_content...) go to the
    chat template as they are."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it: tool call arguments as
        objects (transformers' convention), not JSON text."""
        out = {**(self.model_extra or {}), "role": self.role, "content": self.text()}
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _json_arguments(c)},
                }
                for c in self.tool_calls
            ]
        return out


def _json_arguments(call: MessageToolCall):
    try:
        return json.loads(call.function.arguments)
    except ValueError as e:
        raise InvalidParameterError(
            "messages.tool_calls.function.arguments",
            f"the arguments of tool call {call.id!r} are not JSON: {e}",
        ) from e


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # arguments are enforced either way


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
