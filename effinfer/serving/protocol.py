"""OpenAI-compatible request and response shapes (pydantic), and the OpenAI error object.

Requests accept OpenAI's parameters plus the extras that clients of vLLM-compatible servers send (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, bad_words, priority, request_id, ...). Unknown fields are
kept aside (`unknown_fields`) so that the server can answer 400 naming them, as OpenAI does, or ignore them in
lenient mode. OpenAI fields this server does not implement are refused by name (`unsupported_fields`), never
silently dropped. Range checks live in `SamplingParams`, so the server and the offline API reject the same
values with the same messages.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from effinfer.sampling_params import SamplingParams, StructuredOutputParams


class OpenAIError(Exception):
    """An error that becomes an OpenAI-style JSON error object with an HTTP status."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = Field(default="schema", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def params(self) -> StructuredOutputParams:
        if self.type == "json_object":
            return StructuredOutputParams(json_object=True)
        if self.json_schema is None:
            raise ValueError("response_format: type 'json_schema' needs a 'json_schema' object")
        return StructuredOutputParams(json=json.dumps(self.json_schema.schema_))


class StructuredOutputsField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def params(self) -> StructuredOutputParams:
        given = {"json": self.json_, "json_object": self.json_object or None, "regex": self.regex,
                 "choice": self.choice, "grammar": self.grammar}
        return StructuredOutputParams(**_schema_text({k: v for k, v in given.items() if v is not None}))


def _schema_text(fields: dict) -> dict:
    """A JSON schema given as an object becomes JSON text (what `StructuredOutputParams.json` holds)."""
    if isinstance(fields.get("json"), dict):
        fields = {**fields, "json": json.dumps(fields["json"])}
    return fields


# OpenAI fields whose feature this server does not have: a 400 that names them (a null value passes)
UNSUPPORTED_FIELDS = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "audio": "audio output", "modalities": "non-text output",
    "prediction": "predicted outputs", "web_search_options": "web search",
}


class OpenAIRequest(BaseModel):
    """A request body whose unknown fields are kept aside, for the server to refuse by name or ignore."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class SamplingRequest(OpenAIRequest):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    """False: at most one tool call per answer (chat with tools)."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI sends it) -> bias in [-100, 100] added to its logit."""
    best_of: int | None = Field(default=None, ge=1)
    """Accepted when it equals n (or 1); ranking more samples than are returned is not supported."""
    response_format: ResponseFormat | None = None
    """OpenAI's structured output: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": true}}."""
    structured_outputs: StructuredOutputsField | None = None
    """vLLM's form: exactly one of json (a schema), json_object, regex, choice, grammar (Lark or GBNF)."""
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    # extras of vLLM-compatible servers
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    min_tokens: int = 0
    bad_words: list[str] | None = None
    priority: int = Field(default=0, ge=-2**31, le=2**31 - 1)
    """Lower is served first; under memory pressure the highest is preempted first."""
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    """The id the response carries (default: a fresh one)."""
    early_exit_threshold: float | None = None
    """effinfer extra: per-request confidence for early exit (an engine started with --early-exit-heads)."""

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, feature) for each OpenAI field given whose feature this server does not have."""
        found = [(name, feature) for name, feature in UNSUPPORTED_FIELDS.items() if getattr(self, name) is not None]
        if self.best_of is not None and self.best_of not in (1, self.n):
            found.append(("best_of", "best_of larger than n"))
        return found

    def structured(self) -> StructuredOutputParams | None:
        """The request's output constraint, from whichever of the three forms it used (at most one)."""
        forms = []
        if self.response_format is not None and self.response_format.type != "text":
            forms.append(("response_format", self.response_format.params()))
        if self.structured_outputs is not None:
            forms.append(("structured_outputs", self.structured_outputs.params()))
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        guided = {key: value for key, value in guided.items() if value is not None}
        if guided:
            forms.append(("guided_" + next(iter(guided)), StructuredOutputParams(**_schema_text(guided))))
        if len(forms) > 1:
            raise ValueError(f"{forms[1][0]}: give one output constraint, not {' and '.join(f for f, _ in forms)}")
        return forms[0][1] if forms else None

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            early_exit_threshold=self.early_exit_threshold, min_tokens=self.min_tokens,
            logit_bias=_token_biases(self.logit_bias), bad_words=list(self.bad_words or []),
            structured=self.structured())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None


def _token_biases(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise ValueError(f"logit_bias={bias!r} is invalid: expected token ids (integers) as keys") from None


def _arguments_as_object(call: dict) -> dict:
    """OpenAI sends a call's arguments as JSON text; chat templates write them with `tojson`, so they get the
    object (else the model would see them quoted twice)."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except json.JSONDecodeError:
            pass
    return call


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        """This server's models read text: any other content part (image_url, input_audio, file) is refused."""
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text":
                    raise ValueError(f"content part type {part.get('type')!r} is not supported: "
                                     "this server's model reads text only")
                TextPart.model_validate(part)
        return content

    def check(self, index: int) -> None:
        """Content is required except from an assistant that calls tools."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"messages.{index}.content: a message from the {self.role} role needs content")

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        message = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls is not None:
            message["tool_calls"] = [_arguments_as_object(call) for call in self.tool_calls]
        return message


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments."""
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default: "auto" with tools, "none" without."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (e.g. a model's thinking switch)."""

    def unknown_fields(self) -> list[str]:
        return super().unknown_fields() + [f"messages.{i}.{key}" for i, m in enumerate(self.messages)
                                           for key in sorted(m.model_extra or {})]

    def unsupported_fields(self) -> list[tuple[str, str]]:
        return [(name, feature) for name, feature in super().unsupported_fields()
                if name not in ("tools", "tool_choice")]

    def tool_settings(self) -> tuple[list[dict] | None, str | dict]:
        """(the tools as plain dicts, or None; the effective tool_choice: "none", "auto", "required" or the named
        choice as a dict). ValueError for a tool_choice without tools or naming a function not among them."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        choice = self.tool_choice or ("auto" if tools else "none")
        if not tools and choice != "none":
            raise ValueError(f"tool_choice {self.tool_choice if isinstance(self.tool_choice, str) else 'function'!r} "
                             "needs tools")
        if isinstance(choice, NamedToolChoice):
            choice = choice.model_dump()
            if not any(t["function"]["name"] == choice["function"]["name"] for t in tools):
                raise ValueError(f"tool_choice names the function {choice['function']['name']!r}, which is not "
                                 "among the tools")
        return tools, choice


class EmbeddingRequest(OpenAIRequest):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    """base64: the little-endian float32 bytes (what the OpenAI SDK asks for by default)."""
    dimensions: int | None = Field(default=None, ge=1)
    """Only the model's own width: these models were not trained for shorter embeddings."""
    user: str | None = None
    pooling: Literal["mean", "last"] = "mean"
    """effinfer extra: mean of the prompt's final hidden states, or the last token's."""
    priority: int = Field(default=0, ge=-2**31, le=2**31 - 1)


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
