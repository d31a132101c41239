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
    prompt: str | list[str] = Field("", description="text to continue, or a list of texts (one choice set each)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens to generate per choice (16)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = always the most likely token (1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens (off)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices per prompt (1)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="choice j samples with seed + j: the same seed gives the same text")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end a choice")
    stream: bool | None = Field(None, description="server-sent events, one chunk per token")
    stream_options: StreamOptions | None = None
    echo: bool | None = Field(None, description="put the prompt in front of the completion")
    user: str | None = Field(None, description="accepted for compatibility; unused")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


Finish = Literal["stop", "length"]

# What a field holds, for the message when a value has the wrong type (pydantic's own message for
# a union lists one complaint per member, which reads worse than one sentence).
EXPECTED = {
    "model": "a string",
    "prompt": "a string or a list of strings",
    "stop": f"a string or a list of up to {MAX_STOP} strings",
    "stream_options": 'an object such as {"include_usage": true}',
}


UNION_TAGS = {"str", "list[str]"}


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
        if len(p) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"prompt is {len(p):,} characters, over the limit of {MAX_PROMPT_CHARS:,}; "
                           "shorten it (the model reads only its last block_size tokens)", "prompt",
                           "prompt_too_long")
    return req


def _api_error(errors: list[dict]) -> ApiError:
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
        known = ", ".join(CompletionRequest.model_fields)
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
