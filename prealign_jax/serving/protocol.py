"""The OpenAI-compatible request bodies, strictly typed, and the error body.

Unknown fields and wrong types are refused (pydantic's strict mode: "0.5" is not a
number, `true` is not an integer), as are OpenAI fields this server does not implement
(echo, logprobs, penalties, logit_bias): a client learns at once that it asked for
something it will not get. Extension fields, sent by the `openai` client through
`extra_body`: `policy` (one the operator allowed), `mask` (false only if the operator
allowed it), `top_k`, `return_tagged` (the generated text as tagged text), `copy_quotes`
(quotes copy the user's turn; unset: the operator's `--copy_quotes`), and for
completions `mode` (open a human or ai span after the prompt; "ai" makes the prompt the
user's turn, as the chat template does).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prealign_jax import sampling

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=sampling.SamplingConfig.temperature, ge=0,
                               le=sampling.MAX_TEMPERATURE)
    top_p: float = Field(default=sampling.SamplingConfig.top_p, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=sampling.MAX_SEED)
    user: str | None = None
    policy: str | None = None
    mask: bool = True
    copy_quotes: bool | None = None
    return_tagged: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ProtocolError(f"stop: at most {MAX_STOP} non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters", "stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    mode: Literal["human", "ai"] | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ProtocolError("prompt: give a string or a non-empty list of strings",
                                "prompt")
        return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ProtocolError("give max_tokens or max_completion_tokens, not both",
                                "max_completion_tokens")
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ProtocolError(Exception):
    """A request the server refuses: an OpenAI-style error with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message, param, status, code, kind)

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
