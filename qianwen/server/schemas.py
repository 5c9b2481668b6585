"""OpenAI request and response shapes (the subset we serve), as pydantic models for validation and
for the OpenAPI schema FastAPI publishes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from ..errors import QianwenError
from ..generation.params import OPTIONS, Option, check_option


class _Lenient(BaseModel):
    # unknown fields are ignored, as vLLM and most OpenAI-compatible servers do (clients send extras)
    model_config = ConfigDict(extra="ignore", strict=True)  # "yes" is not a bool, "5" not an int


# ---------------------------------------------------------------- errors

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- requests

class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class ContentPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _RequestFields(_Lenient):
    model: str = Field(description="The model id, as listed by GET /v1/models.")
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # output constraints (qianwen/server/structured.py): OpenAI's response_format, vLLM's guided_* extras
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None


def _checker(name: str) -> Any:
    def check(value: Any) -> Any:
        try:
            return check_option(name, value)
        except QianwenError as e:
            raise ValueError(str(e)) from None
    return check


def _request_field(name: str, opt: Option) -> tuple[Any, Any]:
    """A request field for a sampling option: its type, `check_option` as validator, its range in the schema."""
    kind = {str: str | list[str]}.get(opt.kind, opt.kind)
    bounds = {"minimum": opt.ge, "exclusiveMinimum": opt.gt, "maximum": opt.le}
    extra = {k: v for k, v in bounds.items() if v is not None}
    default = False if opt.kind is bool else None
    annotation = Annotated[kind if opt.kind is bool else kind | None, AfterValidator(_checker(name))]
    return annotation, Field(default, description=opt.help, json_schema_extra=extra or None)


# the sampling fields come from SamplingParams' declaration (generation/params.py), under their OpenAI names
_SamplingFields = create_model("_SamplingFields", __base__=_RequestFields,
                               **{opt.api or name: _request_field(name, opt) for name, opt in OPTIONS.items()})


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}, as vLLM takes it


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, description="0 with echo: score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: the "
                                          "prompt tokens' logprobs too, the first one null)")
    suffix: str | None = None


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize (what lm-evaluation-harness's remote tokenizer calls)."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="Put the BOS token first where the model expects one")


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses

class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    model_max_length: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qianwen"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
