"""Tool calls: how each model family writes them, the structural tag that
makes the model write them validly, and the incremental parser that turns
generated text into content and tool-call deltas.

One parser serves streamed and whole responses (a whole response is one
feed), so streamed argument fragments concatenate to exactly the arguments
of the same response unstreamed: the raw JSON the model wrote.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from tokenmill.entrypoints.reasoning import partial_tag


@dataclass(frozen=True)
class ToolCallFormat:
    """A tool call as `head + name + args_key + {arguments} + end`; `trigger`
    (a prefix of head) is what starts one in free text; `next_head` (when
    the family lists several calls in one block) continues a block."""

    trigger: str
    head: str
    args_key: str
    end: str
    next_head: str | None = None

    def begin(self, name: str) -> str:
        return self.head + name + self.args_key

    def write(self, name: str, arguments: str) -> str:
        return self.begin(name) + arguments + self.end


TOOL_CALL_FORMATS = {
    # Hermes 2 Pro, Qwen 2.5/3, SmolLM: <tool_call>\n{json}\n</tool_call>
    "hermes": ToolCallFormat(
        "<tool_call>", '<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>"
    ),
    # Llama 3.1-3.3: a bare JSON object with "parameters"
    "llama3_json": ToolCallFormat('{"name": ', '{"name": "', '", "parameters": ', "}"),
    # Mistral: [TOOL_CALLS] then a JSON list of calls
    "mistral": ToolCallFormat(
        "[TOOL_CALLS]", '[TOOL_CALLS][{"name": "', '", "arguments": ', "}]", '}, {"name": "'
    ),
}


def structural_tag(fmt: ToolCallFormat, tools: list[dict], choice, parallel: bool) -> dict:
    """The xgrammar structural tag that lets the model write text and tool
    calls in `fmt`, each call naming one of `tools` with arguments valid
    against its parameters schema. choice: "auto", "required", or a tool
    name (exactly one call of it)."""

    def tag(tool: dict) -> dict:
        return {
            "type": "tag",
            "begin": fmt.begin(tool["name"]),
            "content": {
                "type": "json_schema",
                "json_schema": tool.get("parameters") or {"type": "object"},
                # a small model given free whitespace can spend its budget on it
                "max_whitespace_cnt": 1,
            },
            "end": fmt.end,
        }

    if choice not in ("auto", "required"):
        tool = next(t for t in tools if t["name"] == choice)
        return {"type": "structural_tag", "format": tag(tool)}
    if choice == "required":  # calls only, at least one
        calls = {"type": "tags_with_separator", "separator": "\n", "at_least_one": True}
    else:  # text, with calls wherever the model starts one
        calls = {"type": "triggered_tags", "triggers": [fmt.trigger]}
    calls.update(tags=[tag(t) for t in tools], stop_after_first=not parallel)
    return {"type": "structural_tag", "format": calls}


def tools_prompt(fmt: ToolCallFormat, tools: list[dict]) -> str:
    """Describes the tools and the call format, for chat templates that do
    not take tools themselves."""
    signatures = "\n".join(json.dumps({"type": "function", "function": t}) for t in tools)
    example = fmt.write("<function-name>", "<arguments-json-object>")
    return (
        "You may call one or more functions to assist with the user query. "
        f"The functions are:\n<tools>\n{signatures}\n</tools>\n"
        f"To call a function, write:\n{example}"
    )


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def body(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        function: dict = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def body(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


_TEXT, _HEAD, _ARGS, _END = range(4)


@dataclass
class ToolCallParser:
    """Splits one choice's text into content and tool calls as it arrives."""

    fmt: ToolCallFormat
    calls: list[ToolCall] = field(default_factory=list)
    _buf: str = ""
    _space: str = ""
    _state: int = _TEXT
    _head: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _started: bool = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool-call deltas) decided by `text`, the next piece of
        the choice; final=True flushes what was held back."""
        self._buf += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            before = (self._state, len(self._buf))
            if self._state == _TEXT:
                self._text(content, final)
            elif self._state == _HEAD:
                self._head_step(content, deltas, final)
            elif self._state == _ARGS:
                self._args(deltas)
            else:
                self._end(final)
            if (self._state, len(self._buf)) == before:
                break
        if final:
            if self._state in (_TEXT, _HEAD):
                content.append(self._space + self._buf)
                self._space = ""
            self._buf = ""
        return "".join(content), _merge(deltas)

    def _text(self, content: list[str], final: bool) -> None:
        trigger = self.fmt.trigger
        i = self._buf.find(trigger)
        if i >= 0:
            text = self._buf[:i]
            content.append(text.rstrip())
            self._space = text[len(content[-1]) :]  # dropped if a call follows
            self._buf, self._state, self._head = self._buf[i:], _HEAD, self.fmt.head
            return
        if final:
            if self.calls:  # no trailing whitespace after calls
                self._buf = self._buf.rstrip()
            return
        # hold back what may begin a trigger, and whitespace that may precede one
        keep = partial_tag(self._buf, trigger)
        cut = len(self._buf[: len(self._buf) - keep].rstrip())
        content.append(self._buf[:cut])
        self._buf = self._buf[cut:]

    def _head_step(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> None:
        head, args_key = self._head, self.fmt.args_key
        if not self._buf.startswith(head):
            if head.startswith(self._buf) and not final:
                return
            self._fall_back(content)
            return
        q = self._buf.find('"', len(head))  # names hold no quotes; args_key opens with one
        name = self._buf[len(head) : q if q >= 0 else None]
        rest = self._buf[q:] if q >= 0 else ""
        if "\n" in name or not (rest.startswith(args_key) or args_key.startswith(rest)):
            self._fall_back(content)
            return
        if not rest.startswith(args_key):
            if final:
                self._fall_back(content)
            return
        self._space = ""
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name)
        self.calls.append(call)
        deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, name))
        self._buf, self._state = self._buf[q + len(args_key) :], _ARGS
        self._depth, self._in_string, self._escaped, self._started = 0, False, False, False

    def _fall_back(self, content: list[str]) -> None:
        """Not a tool call after all: the trigger (or a continued block) is text."""
        n = len(self.fmt.trigger) if self._head == self.fmt.head else 0
        content.append(self._space + self._buf[:n])
        self._space = ""
        self._buf, self._state = self._buf[n:], _TEXT

    def _args(self, deltas: list[ToolCallDelta]) -> None:
        """Passes the arguments' JSON on as it comes, up to where it closes."""
        end = None
        for k, c in enumerate(self._buf):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = self._started = True
            elif c in "{[":
                self._depth += 1
                self._started = True
            elif c in "}]":
                if self._depth == 0:  # a bare value, closed by the call's own bracket
                    end = k
                    break
                self._depth -= 1
                if self._depth == 0:
                    end = k + 1
                    break
            elif c == "," and self._depth == 0 and self._started:
                end = k
                break
            elif not c.isspace():
                self._started = True
        taken = self._buf if end is None else self._buf[:end]
        if taken:
            self.calls[-1].arguments += taken
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=taken))
        self._buf = self._buf[len(taken) :]
        if end is not None:
            self._state = _END

    def _end(self, final: bool) -> None:
        end, nxt = self.fmt.end, self.fmt.next_head
        if self._buf.startswith(end):
            self._buf, self._state = self._buf[len(end) :], _TEXT
        elif nxt and self._buf.startswith(nxt):
            self._state, self._head = _HEAD, nxt
        elif end.startswith(self._buf) or (nxt and nxt.startswith(self._buf)):
            if final:
                self._buf, self._state = "", _TEXT
        else:
            self._state = _TEXT


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """One delta per call for one feed."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None:
            out[-1].arguments += d.arguments
        else:
            out.append(d)
    return out
