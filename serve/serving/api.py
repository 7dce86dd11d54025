"""What `orpo serve` accepts and answers, as pydantic models: the OpenAI chat and completions
shapes we serve, /v1/score, and the error body. FastAPI builds the OpenAPI schema from them, so
clients and fuzzers see every route as it is.

Requests ignore fields they do not know (OpenAI SDKs send new ones every release) but check
every field they use: a value out of range is a 422 naming the field, never a failure later.
/v1/score's bodies are strict (an unknown field is a 422) and checked by the core's checks of
dataset rows, so a pair the server scores is a pair training would have read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictStr, Tag, model_validator
from pydantic_core import PydanticCustomError

from orpo_plugin.core.formats import BadRow, check_prompt_order, messages, text

# Bounds of the sampling settings, as OpenAI documents them where it has them.
Temperature = Annotated[float, Field(ge=0, le=2)]
Probability = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
MaxTokens = Annotated[int, Field(ge=1, le=1 << 24)]
Stop = StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=16)] | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class OtherPart(BaseModel):
    """image_url, input_audio, file, ...: refused, as the models we export read text only."""

    model_config = ConfigDict(extra="allow")
    type: StrictStr


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[TextPart | OtherPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None


class StreamOptions(_Request):
    include_usage: StrictBool = False


class JSONSchemaFormat(_Request):
    name: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampling(_Request):
    model: StrictStr | None = None
    temperature: Temperature = 0.8
    top_p: Probability = 0.95
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] = 40
    min_p: Probability = 0.05
    typical_p: Probability = 1.0
    repeat_penalty: Annotated[float, Field(ge=0, le=10)] = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)] | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    grammar: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        None, description="a GBNF grammar the answer must follow (llama.cpp's format)"
    )
    logit_bias: dict[StrictStr, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit"
    )
    n: Annotated[int, Field(ge=1, le=1, description="only 1")] = 1
    user: StrictStr | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="passed to the chat template")
    tool_choice: Any = None
    logprobs: StrictBool | None = Field(None, description="not supported: use /v1/score for log-probs")
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: (
        StrictStr
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    )
    max_tokens: MaxTokens = 16
    echo: StrictBool = False
    suffix: StrictStr | None = Field(None, description="not supported")
    logprobs: int | None = Field(None, description="not supported: use /v1/score for log-probs")
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _Reply(BaseModel):
    id: str
    created: int
    model: str = Field(description="the GGUF's file name")


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Reply):
    """One `data:` event of a streamed chat; the last (with stream_options.include_usage) has
    no choices and the usage."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Reply):
    """A completion, and each `data:` event of a streamed one (object "text_completion" in both, as OpenAI)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "orpo"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str


class ScoreMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


CORE_CHECK = "core_check"  # the error type of core's checks; ctx["field"] names the field inside the model


def invalid(field: str, detail: str) -> PydanticCustomError:
    return PydanticCustomError(CORE_CHECK, "{detail}", {"field": field, "detail": detail})


class ScorePair(BaseModel):
    """One preference pair. prompt: one user turn, or a conversation (ending with a user turn),
    or raw text with template false. Checked as training checks dataset rows (core.formats)."""

    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[ScoreMessage], Field(min_length=1)]
    chosen: Annotated[str, Field(min_length=1)]
    rejected: Annotated[str, Field(min_length=1)]
    template: bool = True

    @model_validator(mode="before")
    @classmethod
    def _as_training_checks_rows(cls, item):
        if not isinstance(item, dict):
            raise invalid("", "expected a JSON object with prompt, chosen, rejected")
        unknown = sorted(set(item) - set(cls.model_fields))
        if unknown:
            raise invalid(unknown[0], f"unknown field; a pair has {', '.join(sorted(cls.model_fields))}")
        template = item.get("template", True)
        if not isinstance(template, bool):
            raise invalid("template", "expected true or false")
        try:
            if isinstance(item.get("prompt"), list):
                if not template:
                    raise BadRow("prompt", "not_string", 'raw scoring ("template": false) needs the prompt as a string')
                prompt = check_prompt_order(messages(item["prompt"], "prompt"), "prompt")
            else:
                prompt = text(item, "prompt")
            return {
                "prompt": prompt,
                "chosen": text(item, "chosen"),
                "rejected": text(item, "rejected"),
                "template": template,
            }
        except BadRow as bad:
            raise invalid(bad.field, bad.detail) from None


class ScoreBatch(BaseModel):
    """Several pairs, scored in one request (at most `orpo serve --max-pairs`)."""

    model_config = ConfigDict(extra="forbid")
    pairs: Annotated[list[ScorePair], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _only_pairs(cls, body):
        if set(body) != {"pairs"}:
            raise invalid("", "a batch body has only 'pairs'; put prompt/chosen/rejected in each pair")
        if not isinstance(body["pairs"], list) or not body["pairs"]:
            raise invalid("pairs", "expected a non-empty list of pairs")
        return body


def _score_body_kind(body) -> str:
    return "ScoreBatch" if isinstance(body, dict) and "pairs" in body else "ScorePair"


# A /v1/score body: {"pairs": [...]} is a batch, anything else one pair.
ScoreBody = Annotated[
    Annotated[ScorePair, Tag("ScorePair")] | Annotated[ScoreBatch, Tag("ScoreBatch")], Discriminator(_score_body_kind)
]


class AnswerScore(BaseModel):
    logprob: float = Field(description="sum of the answer's token log-probs (EOS included)")
    avg_logprob: float = Field(description="their mean, the quantity ORPO's odds use")
    n_tokens: int


class PairScore(BaseModel):
    chosen: AnswerScore
    rejected: AnswerScore
    log_odds_ratio: float
    preferred: Literal["chosen", "rejected"]


class ScoreResults(BaseModel):
    results: list[PairScore]


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "authentication_error", "server_error"]
    param: str | None = None
    code: str | None = None


class Error(BaseModel):
    error: ErrorDetail
