"""Request and response models of the OpenAI-compatible API (plus vLLM's extras and /tokenize shapes).

Field bounds that SamplingParams.validate also checks are left to it, so there is one message per rule;
the bounds set here are the ones that guard the server itself (sizes, integer ranges).
"""

from __future__ import annotations

import functools
import time
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)

# Integer fields are bounded so that no client value can overflow a C integer further down.
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_MAX_N = 128


MAX_ERROR_MESSAGE = 1000  # characters of an error message sent back; the rest is cut


class APIError(Exception):
    """An error answered to the client in OpenAI's shape; raised anywhere, turned into JSON in one place."""

    def __init__(
        self, status_code: int, message: str, type: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param

    def to_model(self) -> ErrorResponse:
        message = self.message
        if len(message) > MAX_ERROR_MESSAGE:  # it may quote a client's value (a model name, a schema)
            message = f"{message[:MAX_ERROR_MESSAGE]}... ({len(message)} characters in all)"
        return ErrorResponse(
            error=ErrorInfo(message=message, type=self.type, param=self.param, code=self.status_code)
        )


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _check_text(value: Any) -> Any:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"); they are no text and cannot be encoded,
    tokenized or echoed back, so refuse them at the edge."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError("the text holds a lone surrogate, which is not valid Unicode") from e
    elif isinstance(value, list) and value and not isinstance(value[0], int | float):
        for item in value:  # validated lists are homogeneous: a list of numbers holds no text
            _check_text(item)
    elif isinstance(value, dict):
        for key in value:
            _check_text(key)
    return value


class _Request(BaseModel):
    # Unknown fields are ignored (as OpenAI SDKs send new ones); NaN/inf are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return _check_text(value)


def _accepts_none(annotation: Any) -> bool:
    if annotation is None or annotation is Any:
        return True
    if typing.get_origin(annotation) is Annotated:
        return _accepts_none(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_none(a) for a in typing.get_args(annotation))
    return annotation is type(None)


class _NullIsUnset(_Request):
    """An explicit null for a field whose default is not null (n, stream, echo, presence_penalty, ...)
    means that default, as OpenAI's API and vLLM read it; clients in typed languages send every field."""

    @classmethod
    @functools.cache
    def _defaulted(cls) -> frozenset[str]:
        return frozenset(
            key
            for name, f in cls.model_fields.items()
            if not f.is_required() and not _accepts_none(f.annotation)
            for key in (name, f.alias)
            if key
        )

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaulted = cls._defaulted()
            if any(data.get(key, 0) is None for key in defaulted):
                return {k: v for k, v in data.items() if v is not None or k not in defaulted}
        return data


class StreamOptions(_NullIsUnset):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class JsonSchemaFormat(_Request):
    """OpenAI's response_format.json_schema. `strict` is accepted either way: the schema is always enforced."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs`: exactly one of these constraints."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    json_: dict[str, Any] | str | bool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(_NullIsUnset):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=_MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=_I64_MIN, le=_I64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False  # the stop string or stop token's text ends the text
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's output extras
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=_I64_MAX)  # keep the prompt's last k tokens
    skip_special_tokens: bool = True  # False: control tokens the model writes show in the text
    spaces_between_special_tokens: bool = True  # accepted; byte-level BPE text has no spaces to add
    return_tokens_as_token_ids: bool = False  # logprob tokens named "token_id:N"
    return_token_ids: bool = False  # the prompt's and each choice's token ids beside the text
    prompt_logprobs: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)  # each prompt token's, and top-N
    # vLLM extras this server does not run: a request that sets one is answered 400 rather than ignored
    use_beam_search: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    logits_processors: Any = None

    def refused_extra(self) -> tuple[str, str] | None:
        """(field, why) for a vLLM extra this server cannot honour."""
        if self.use_beam_search:
            return "use_beam_search", "beam search is not supported; ask for n sampled choices instead."
        if self.bad_words:
            return "bad_words", "bad_words is not supported; use logit_bias with -100 for their tokens."
        if self.allowed_token_ids:
            return "allowed_token_ids", "allowed_token_ids is not supported; use structured_outputs' choice."
        if self.logits_processors:
            return "logits_processors", "custom logits processors are not supported."
        return None


def _prompt_kind(value: Any) -> str:
    """Which of the prompt's forms `value` is, from its first element: validated as that form alone.
    (A plain union tries every form, and a failed form collects an error per element of a long list.)"""
    if not isinstance(value, list):
        return "text"
    first = value[0] if value else None
    return "texts" if isinstance(first, str) else "batch" if isinstance(first, list) else "ids"


Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[int], Tag("ids")]
    | Annotated[list[list[int]], Tag("batch")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=_I64_MIN, le=_I64_MAX)
    logprobs: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    echo: bool = False
    best_of: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)  # only best_of == n (the same thing)
    suffix: str | None = None  # refused unless empty
    # vLLM's: the tokenizer's own additions to a text prompt (a BOS its post-processor adds), as /tokenize
    add_special_tokens: bool = True

    def refused_field(self) -> tuple[str, str] | None:
        """(field, why) for a field this server cannot honour: answered 400 rather than ignored."""
        if (refused := self.refused_extra()) is not None:
            return refused
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported (only best_of equal to n); ask for n choices instead."
        if self.suffix:
            return "suffix", "suffix (text insertion) is not supported by this model."
        return None


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # developer is OpenAI's new name for system; tool carries a tool's result (tool_call_id names the call)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            # an assistant message's refusal part (OpenAI's) is its text
            value = [
                {"type": "text", "text": p.get("refusal")}
                if isinstance(p, dict) and p.get("type") == "refusal"
                else p
                for p in value
            ]
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(
                        f"content part {i} has type {kind[:40]!r}; this model reads only 'text' parts"
                    )
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # accepted either way: with tool_choice required/named the schema is enforced


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


# Fields of the openai SDK's chat request that this server cannot honour: a request that sets one is
# answered 400 naming it (README: "Request fields"). Fields that change nothing here (store, metadata,
# service_tier, user, ...) are accepted and ignored, as vLLM does.
_REFUSED_CHAT_FIELDS = {
    "audio": "audio output is not supported by this model",
    "functions": "functions (deprecated) are not supported; send tools instead",
    "function_call": "function_call (deprecated) is not supported; send tool_choice instead",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not available on this server",
    "moderation": "moderation is not available on this server",
    # vLLM's: a template sent with the request is code from the client; the model's own one is used
    "chat_template": "a chat template sent with the request is not supported; the model's own is used",
}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    max_completion_tokens: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM extra: the last message is continued, not closed
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None  # only ["text"]
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    chat_template: Any = None

    def refused_field(self) -> tuple[str, str] | None:
        """(field, why) for a field this server cannot honour: answered 400 rather than ignored."""
        if (refused := self.refused_extra()) is not None:
            return refused
        for name, why in _REFUSED_CHAT_FIELDS.items():
            if getattr(self, name) is not None:
                return name, why
        if self.modalities is not None and set(self.modalities) - {"text"}:
            return "modalities", "only the text modality is supported"
        return None


# ---- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    """OpenAI completions shape: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One token of vLLM's prompt_logprobs: keyed by its id, its log-probability at that position."""

    logprob: float
    rank: int  # 1 = the most likely token there
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt position; the first has none


class _OmittedUnlessAsked(BaseModel):
    """vLLM's return_token_ids and prompt_logprobs fields, left out of the JSON unless asked for (they
    would be nulls in every chunk of every stream otherwise)."""

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in ("prompt_token_ids", "token_ids", "prompt_logprobs"):
            if key in data and data[key] is None:
                del data[key]
        return data


class CompletionChoice(_OmittedUnlessAsked):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop_token_ids id that ended it
    prompt_token_ids: list[int] | None = None  # with return_token_ids (a stream: in a choice's first chunk)
    token_ids: list[int] | None = None  # with return_token_ids: the tokens this choice (or chunk) adds
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with prompt_logprobs (not streamed)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _drop_empty_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatChoice(_OmittedUnlessAsked):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_OmittedUnlessAsked):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's deltas carry only the fields that changed: {"role": ...} first, then {"content": ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(_OmittedUnlessAsked):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_OmittedUnlessAsked):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids, in the first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "smollm2-server"
    root: str | None = None
    max_model_len: int
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(_NullIsUnset):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False  # vLLM's: each token's text beside its id


class TokenizeChatRequest(_NullIsUnset):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ChatTool] | None = None  # rendered into the prompt as a chat request's are
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # "none": left out
    parallel_tool_calls: bool | None = None
    return_token_strs: bool = False


def _tokenize_kind(value: Any) -> str:
    """A /tokenize body with messages is the chat form (validated as that alone, errors worded for it)."""
    chat = isinstance(value, TokenizeChatRequest) or (isinstance(value, dict) and "messages" in value)
    return "chat" if chat else "completion"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("completion")] | Annotated[TokenizeChatRequest, Tag("chat")],
    Discriminator(_tokenize_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# ---- /v1/responses ---------------------------------------------------------------------------------


class ResponsesRequest(_NullIsUnset):
    """OpenAI's Responses API request: what server.responses turns into a chat request."""

    model: str
    input: str | list[Any]  # items are read one by one (server.responses), each error naming its index
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=_I64_MIN, le=_I64_MAX)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
