"""What a chat request becomes before and after the engine: the template's
inputs and the constraint that tools add, then the parsers that split each
choice's text into reasoning, content and tool calls."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tokenmill.entrypoints.protocol import ChatCompletionRequest
from tokenmill.entrypoints.reasoning import REASONING_PARSERS, ReasoningParser
from tokenmill.entrypoints.tool_calls import (
    TOOL_CALL_FORMATS,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallParser,
    structural_tag,
    tools_prompt,
)
from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import StructuredOutputsParams


@dataclass(frozen=True)
class ChatOptions:
    """Server-wide chat settings: tokenmill serve's --tool-call-parser,
    --enable-auto-tool-choice and --reasoning-parser."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def __post_init__(self):
        if self.tool_call_parser not in (None, *TOOL_CALL_FORMATS):
            raise ValueError(
                f"unknown tool call parser {self.tool_call_parser!r}; "
                f"choose from {', '.join(TOOL_CALL_FORMATS)}"
            )
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(
                f"unknown reasoning parser {self.reasoning_parser!r}; "
                f"choose from {', '.join(REASONING_PARSERS)}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def body(self, with_reasoning: bool) -> dict:
        """The `delta` of a stream chunk; empty when nothing was decided."""
        out: dict = {}
        if with_reasoning and self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = [d.body() for d in self.tool_calls]
        return out


class ChoiceParser:
    """One choice's text, piece by piece, as reasoning, content and tool calls."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning else ("", text)
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
        return ChatDelta(reasoning, content, calls)

    @property
    def called(self) -> bool:
        return bool(self.tools and self.tools.calls)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason

    def message(self, text: str, with_reasoning: bool) -> dict:
        """The whole choice as an assistant message."""
        delta = self.feed(text, final=True)
        message: dict = {"role": "assistant", "content": delta.content or None}
        if with_reasoning:
            message["reasoning_content"] = delta.reasoning or None
        if self.called:
            message["tool_calls"] = [c.body() for c in self.tools.calls]
        elif message["content"] is None:
            message["content"] = ""
        return message


@dataclass
class ChatPlan:
    """The template's inputs and the output constraint and parsers of one request."""

    messages: list[dict]
    template_kwargs: dict
    constraint: StructuredOutputsParams | None = None
    tool_format: ToolCallFormat | None = None
    reasoning_opened: bool | None = None

    @property
    def with_reasoning(self) -> bool:
        return self.reasoning_opened is not None

    @property
    def raw_text(self) -> bool:
        """Whether the parsers need the special tokens that mark the sections."""
        return self.tool_format is not None or self.with_reasoning

    def parser(self) -> ChoiceParser:
        return ChoiceParser(
            ReasoningParser(self.reasoning_opened) if self.with_reasoning else None,
            ToolCallParser(self.tool_format) if self.tool_format else None,
        )


def plan_chat(req: ChatCompletionRequest, options: ChatOptions, template: str | None) -> ChatPlan:
    """Resolves tools and tool_choice against the server's options; `template`
    is the chat template's source (tools go through it when it takes them)."""
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = {"messages", "tools", "add_generation_prompt", "chat_template", "tokenize"}
    if reserved & kwargs.keys():
        raise InvalidParameterError(
            "chat_template_kwargs",
            f"chat_template_kwargs cannot set {', '.join(sorted(reserved & kwargs.keys()))}",
        )
    plan = ChatPlan([m.for_template() for m in req.messages], kwargs)
    if options.reasoning_parser is not None:
        plan.reasoning_opened = REASONING_PARSERS[options.reasoning_parser]
    choice = _tool_choice(req, options)
    if choice is None:
        return plan
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools]
    fmt = TOOL_CALL_FORMATS[options.tool_call_parser or "hermes"]
    plan.tool_format = fmt
    plan.constraint = StructuredOutputsParams(
        structural_tag=structural_tag(fmt, tools, choice, req.parallel_tool_calls)
    )
    if template is not None and "tools" in template:
        plan.template_kwargs["tools"] = [{"type": "function", "function": t} for t in tools]
    else:
        plan.messages = _describe_tools(plan.messages, fmt, tools)
    return plan


def _tool_choice(req: ChatCompletionRequest, options: ChatOptions) -> str | None:
    """ "auto", "required", a tool's name, or None where tools are off."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise InvalidParameterError("tool_choice", "tool_choice needs tools")
        return None
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if req.structured() is not None:
        raise InvalidParameterError(
            req.structured()[0], f"{req.structured()[0]} cannot be combined with tool calls"
        )
    if choice == "auto":
        if not options.enable_auto_tool_choice:
            raise InvalidParameterError(
                "tool_choice",
                'tool_choice "auto" (the default with tools) needs the server started with '
                "--enable-auto-tool-choice --tool-call-parser NAME; "
                'or send tool_choice "required", "none" or a named function',
            )
        return choice
    if choice == "required":
        return choice
    names = [t.function.name for t in req.tools]
    if choice.function.name not in names:
        raise InvalidParameterError(
            "tool_choice", f"tool_choice names {choice.function.name!r}, not one of the tools"
        )
    return choice.function.name


def _describe_tools(messages: list[dict], fmt: ToolCallFormat, tools: list[dict]) -> list[dict]:
    """For a template that does not take tools: the tools go into the system
    message, and earlier calls into their messages' text, in `fmt`."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(
                fmt.write(c["function"]["name"], json.dumps(c["function"]["arguments"]))
                for c in m["tool_calls"]
            )
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m["content"] + "\n" if m["content"] else "") + calls
        out.append(m)
    prompt = tools_prompt(fmt, tools)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
