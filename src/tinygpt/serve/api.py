"""The HTTP API's shapes: the completion request, its limits, and OpenAI's error body.

The request is parsed by pydantic in strict mode (a string is not a number, `true` is not 1),
and every way a body can be wrong becomes an `ApiError` with OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, and a 4xx status — never a 500.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 1_000_000  # a request body over 1 MB is refused (413) before it is parsed
MAX_PROMPT_CHARS = 32_768  # the model reads only its last block_size tokens; longer is a mistake
MAX_TOKENS = 4096  # tokens generated per choice
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts per request
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_LOGPROBS = 20  # alternatives per position, as OpenAI's legacy completions


class ApiError(Exception):
    """An error answered with OpenAI's error body; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="end the stream with a chunk that carries usage counts")


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's fields that make sense for a char model, plus top_k.

    A field given as null takes its default, as OpenAI does.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(None, description="the served run's name; may be left out")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        "", description="text to continue, a list of texts (one choice set each), token ids, or a list of those")
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS,
                                   description="tokens to generate per choice (16); 0 with echo scores the prompt")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = always the most likely token (1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens (off)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices per prompt (1)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="choice j samples with seed + j: the same seed gives the same text")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end a choice")
    stream: bool | None = Field(None, description="server-sent events, one chunk per token")
    stream_options: StreamOptions | None = None
    echo: bool | None = Field(None, description="put the prompt in front of the completion (and its logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="return each token's log-probability and this many most likely "
                                 "alternatives per position (0: the chosen token's only)")
    window: Literal["full", "chunked"] | None = Field(
        None, description="past the model's block: full = its last block_size tokens (the lecture's text, a forward "
        "over the whole block per token); chunked = once full, keep the last half and continue cached (faster, "
        "other text). Default: the server's --window")
    user: str | None = Field(None, description="accepted for compatibility; unused")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return [p]
        return list(p)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(..., description="the message's text (or OpenAI's text parts)")
    name: str | None = Field(None, description="accepted for compatibility; unused")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's chat fields that make sense here, plus top_k.

    A field given as null takes its default, as OpenAI does."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(None, description="the served run's name; may be left out")
    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens to generate per choice (the "
                                   "model's block_size)")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="the same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = always the most likely token (1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens (off)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices (1)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="choice j samples with seed + j: the same seed gives the same reply")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end a reply (it also "
                                         "ends at the model's end of turn)")
    stream: bool | None = Field(None, description="server-sent events, chunks with a delta each")
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="return each reply token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="with logprobs: this many most likely alternatives per position")
    window: Literal["full", "chunked"] | None = Field(None, description="as for /v1/completions")
    user: str | None = Field(None, description="accepted for compatibility; unused")

    stops = CompletionRequest.stops

    def want_logprobs(self) -> int | None:
        """Alternatives per position the worker must keep (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """The request in `body`, or an ApiError(400) naming the first thing wrong with it."""
    req = parse_body(ChatCompletionRequest, body)
    stops = req.stops()
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings", "stop", "invalid_value")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    size = sum(len(m.text()) for m in req.messages)
    if size > MAX_PROMPT_CHARS:
        raise ApiError(400, f"messages hold {size:,} characters, over the limit of {MAX_PROMPT_CHARS:,}; send fewer "
                       "(the model reads only its last block_size tokens)", "messages", "prompt_too_long")
    return req


Finish = Literal["stop", "length"]

# What a field holds, for the message when a value has the wrong type (pydantic's own message for
# a union lists one complaint per member, which reads worse than one sentence).
EXPECTED = {
    "model": "a string",
    "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
    "stop": f"a string or a list of up to {MAX_STOP} strings",
    "stream_options": 'an object such as {"include_usage": true}',
    "messages": 'a list of messages such as {"role": "user", "content": "hello"}',
}


UNION_TAGS = {"str", "list[str]", "list[int]", "list[list[int]]"}


def parse_completion_request(body: bytes) -> CompletionRequest:
    """The request in `body`, or an ApiError(400) naming the first thing wrong with it."""
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False)) from None
    prompts, stops = req.prompts(), req.stops()
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", "prompt", "invalid_value")
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings", "stop", "invalid_value")
    for p in prompts:
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt: a list of token ids must not be empty", "prompt", "invalid_value")
        if len(p) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"prompt is {len(p):,} characters, over the limit of {MAX_PROMPT_CHARS:,}; "
                           "shorten it (the model reads only its last block_size tokens)", "prompt",
                           "prompt_too_long")
    return req


def _api_error(errors: list[dict], model: type[BaseModel] = CompletionRequest) -> ApiError:
    # The first field at fault; of a union's complaints about it, the one that looked deepest
    # (["a", 3] for a prompt: item 1 is not a string, rather than "not a string").
    first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first['ctx']['error']}); send a JSON object",
                        None, "invalid_json")
    if not first["loc"]:
        return ApiError(400, "the body must be a JSON object of completion parameters", None, "invalid_type")
    field = str(first["loc"][0])
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return ApiError(400, f"{field} is not a parameter tinygpt serve accepts; use: {known}", field,
                        "unsupported_parameter")
    # pydantic names the member of a union it tried ("str", "list[str]") in the location; drop it
    path = [str(p) for p in first["loc"] if p not in UNION_TAGS]
    param = ".".join(path)
    if field in EXPECTED and first["type"].endswith("_type") and len(path) == 1:
        return ApiError(400, f"{field} must be {EXPECTED[field]}, got {_short(first['input'])}", param,
                        "invalid_type")
    code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return ApiError(400, f"{param}: {first['msg']}, got {_short(first['input'])}", param, code)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TokenizeRequest(BaseModel):
    """POST /tokenize, in vLLM's shape: text to token ids."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served run's name; may be left out")
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="the text to encode")
    add_special_tokens: bool = Field(False, description="accepted for compatibility: tinygpt adds none")


class DetokenizeRequest(BaseModel):
    """POST /detokenize, in vLLM's shape: token ids to text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served run's name; may be left out")
    tokens: list[int] = Field(..., max_length=MAX_PROMPT_CHARS, description="the token ids to decode")


def parse_body(model: type[BaseModel], body: bytes):
    """`body` as `model`, or an ApiError(400) naming the first thing wrong (as for completions)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False), model) from None


MAX_INSPECT_TOP = 20


class InspectRequest(BaseModel):
    """POST /v1/inspect (tinygpt's own): what the model believes at each position of a text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served run's name; may be left out")
    text: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS,
                      description="the text to inspect: at most block_size tokens")
    top: int = Field(5, ge=1, le=MAX_INSPECT_TOP, description="alternatives to list per position")
    attention: bool = Field(True, description="include every layer's and head's attention probabilities")


# --- what the server answers, for the OpenAPI schema (/openapi.json) -------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body; every 4xx and 5xx has it."""

    error: ErrorDetail


class LogprobsObject(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: LogprobsObject | None
    finish_reason: Finish | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The answer of POST /v1/completions (a stream sends chunks of this shape, then [DONE])."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Finish | None


class ChatCompletionResponse(BaseModel):
    """The answer of POST /v1/chat/completions (a stream sends chat.completion.chunk objects, each
    choice with a `delta`, then [DONE])."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    kind: str
    vocab_size: int
    model_max_length: int
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None


class Alternative(BaseModel):
    token: str
    id: int
    logprob: float
    prob: float


class InspectedToken(BaseModel):
    token: str
    id: int
    next_logprob: float | None
    next_prob: float | None
    top: list[Alternative]


class InspectResponse(BaseModel):
    object: Literal["inspection"]
    model: str
    text: str
    tokens: list[InspectedToken]
    attention: list[list[list[list[float]]]] | None = Field(
        description="[layer][head][query] -> the query's weights over positions 0..query")
    n_layer: int
    n_head: int


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest, InspectRequest)
