"""Tool calling: what `tools` and `tool_choice` turn into, and tool calls read back out of the model's text.

- `tool_choice="auto"`: the tools go to the model's chat template, the model writes calls in its family's format,
  and a parser of that format (chosen from the template: `PARSERS`) turns them into `message.tool_calls`,
  streamed as deltas once each call is complete.
- `"required"` or a named function: structured output forces the answer (vLLM's approach, whatever the model's
  format): a named function's arguments as JSON that validates against its parameters, or for `"required"` a
  JSON array of `{"name", "parameters"}` objects, one per call, each naming a given tool.
- `"none"`: no tools in the prompt, plain text out.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from effinfer.sampling_params import StructuredOutputParams


@dataclass
class ToolCall:
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_dict(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


class HermesParser:
    """Hermes-style calls (Qwen2.5, Hermes, many others): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
    Small models often drop the tags: an answer that is, whole, one such JSON object is read as that call too.
    Only calls that name one of the request's tools count; anything else stays text."""

    start, end = "<tool_call>", "</tool_call>"

    def __init__(self, tool_names: list[str]):
        self.tool_names = set(tool_names)

    def bare_call(self, text: str) -> ToolCall | None:
        return self.read_call(text.strip()) if text.strip().startswith("{") else None

    def read_call(self, payload: str) -> ToolCall | None:
        try:
            value = json.loads(payload)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.tool_names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        return ToolCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


PARSERS = {"hermes": HermesParser}
"""Tool-call formats by name; a chat template that writes a format's opening tag picks it (`parser_for`)."""


def parser_for(chat_template: str | None):
    """The parser class of the format this chat template asks for, or None."""
    for parser in PARSERS.values():
        if chat_template and parser.start in chat_template:
            return parser
    return None


class ToolCallStream:
    """Splits a streamed answer into content deltas and complete tool calls. Text that may be the start of a call
    tag is held back until it is decided; a call is emitted once its closing tag arrives. An answer that opens
    with `{` is held whole: it may be a call written without tags."""

    def __init__(self, parser):
        self.parser, self.buffer, self.calls, self.started = parser, "", [], False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        if not self.started:
            if not self.buffer.strip() or self.buffer.lstrip().startswith("{"):
                return "", []
            self.started = True
        content, calls = "", []
        while True:
            start = self.buffer.find(self.parser.start)
            if start < 0:
                keep = _partial_tag_length(self.buffer, self.parser.start)
                content += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            end = self.buffer.find(self.parser.end, start)
            if end < 0:
                content += self.buffer[:start]
                self.buffer = self.buffer[start:]
                break
            call = self.parser.read_call(self.buffer[start + len(self.parser.start):end].strip())
            if call is None:
                content += self.buffer[:end + len(self.parser.end)]
            else:
                content += self.buffer[:start]
                calls.append(call)
            self.buffer = self.buffer[end + len(self.parser.end):]
        self.calls += calls
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left: a held answer that is a bare call, else text (an unclosed call, a partial tag)."""
        rest, self.buffer = self.buffer, ""
        if not self.started:
            bare = self.parser.bare_call(rest)
            if bare is not None:
                self.calls.append(bare)
                return "", [bare]
            self.started = True
            content, calls = self.feed(rest)
            rest, self.buffer = self.buffer, ""
            return content + rest, calls
        return rest, []


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def forced_constraint(tools: list[dict], tool_choice, parallel: bool) -> StructuredOutputParams | None:
    """The structured output that `"required"` or a named function needs (None for "auto" and "none")."""
    if isinstance(tool_choice, dict):   # its name is among the tools (ChatCompletionRequest.tool_settings)
        tool = next(t for t in tools if t["function"]["name"] == tool_choice["function"]["name"])
        return StructuredOutputParams(json=json.dumps(_parameters(tool)))
    if tool_choice != "required":
        return None
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
         "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t)}} for t in tools]}}
    if not parallel:
        calls["maxItems"] = 1
    return StructuredOutputParams(json=json.dumps(calls))


def forced_calls(text: str, tool_choice) -> list[ToolCall]:
    """The calls in a forced answer (what `forced_constraint` made the model write)."""
    if isinstance(tool_choice, dict):
        return [ToolCall(tool_choice["function"]["name"], text)]
    return [ToolCall(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


class ChatDeltas:
    """One choice's text, as it streams, into chat deltas: plain content without tools; with them, content and
    tool-call deltas (`{"index", "id", "type", "function": {"name", "arguments"}}`, the arguments of a named
    call streamed as they come, other calls whole once complete). `message(text)` is the non-streaming form."""

    def __init__(self, tool_choice=None, parser: HermesParser | None = None, parallel: bool = True):
        self.named = ToolCall(tool_choice["function"]["name"], "") if isinstance(tool_choice, dict) else None
        """The one call a named tool_choice makes: its arguments are the answer."""
        self.required = tool_choice == "required"
        self.calls = ToolCallStream(parser) if parser is not None and tool_choice == "auto" else None
        self.parallel, self.num_calls, self.text = parallel, 0, ""

    def feed(self, text: str) -> list[dict]:
        if self.named is not None:
            out = [] if self.num_calls else [{"tool_calls": [self.named.as_dict(0)]}]
            self.num_calls = 1
            return out + ([{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else [])
        if self.required:
            self.text += text
            return []
        if self.calls is None:
            return [{"content": text}] if text else []
        return self._emit(*self.calls.feed(text))

    def finish(self) -> list[dict]:
        if self.required:
            try:
                return self._emit("", forced_calls(self.text, "required"))
            except (ValueError, KeyError, TypeError):   # cut short by max_tokens: the text as it is
                return [{"content": self.text}] if self.text else []
        return self._emit(*self.calls.finish()) if self.calls is not None else []

    def _emit(self, content: str, calls: list[ToolCall]) -> list[dict]:
        out = [{"content": content}] if content else []
        for call in calls:
            if self.num_calls and not self.parallel:
                continue
            out.append({"tool_calls": [call.as_dict(self.num_calls)]})
            self.num_calls += 1
        return out

    def message(self, text: str) -> dict:
        deltas = self.feed(text) + self.finish()
        content = "".join(d.get("content", "") for d in deltas)
        calls: dict[int, dict] = {}
        for delta in deltas:
            for call in delta.get("tool_calls", []):
                entry = calls.setdefault(call["index"], {"id": call.get("id"), "type": "function",
                                                         "function": {"name": call["function"].get("name"),
                                                                      "arguments": ""}})
                entry["function"]["arguments"] += call["function"].get("arguments", "")
        if not calls:
            return {"role": "assistant", "content": content}
        return {"role": "assistant", "content": content.strip() or None,
                "tool_calls": [calls[i] for i in sorted(calls)]}

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.num_calls and reason == "stop" else reason
