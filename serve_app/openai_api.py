"""OpenAI-compatible request models, response builders and the error shape.

Errors always answer ``{"error": {"message", "type", "param", "code"}}`` with the right status.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    """A message's role and text; ``name`` and other fields are not rendered. Tool calls are
    refused (tools are), rather than dropped from the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = Field(
        None, description="Text, or OpenAI content parts of type text (null: no text, as an "
                          "assistant turn may have).")
    tool_calls: list | None = None
    function_call: dict | None = None

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_tool_calls(cls, v):
        if v:
            raise ValueError("tool calls are not supported by this server")
        return None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


# OpenAI request fields this server does not implement, with the values that ask for nothing
# (what the field's absence means): any other value is a 400 naming the field, never an answer
# that silently ignores it.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "suffix": (None, ""), "echo": (None, False), "modalities": (None, ["text"]),
}
# OpenAI request fields that change nothing in the answer (bookkeeping, caching and latency
# hints): accepted and ignored. Any other field this server does not know is a 400 unless it is
# null, as OpenAI answers one: a misspelt ``max_token`` would otherwise give 256 tokens, silently.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                            "prompt_cache_key", "safety_identifier", "prediction"})


class SamplingFields(BaseModel):
    """Fields common to both endpoints. Of the fields not declared here, ``check_supported``
    accepts those that change nothing (``IGNORED_FIELDS``), the unimplemented OpenAI ones at
    their neutral values (``UNSUPPORTED_FIELDS``) and any sent as null, and refuses the rest;
    ``null`` means the default (or absence), as the OpenAI API treats it."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="0 keeps the most likely token.")
    top_k: int = Field(0, ge=0, description="Extension: keep the k most likely tokens.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    arm: str | None = Field(None, description="Extension: pin the speculative-decoding arm.")
    best_of: int | None = Field(None, ge=1, description="Accepted only as `n` (or null).")

    @field_validator("temperature", "top_p", "top_k", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return [v] if isinstance(v, str) else v

    def check_supported(self) -> None:
        """400 for a field that asks for something this server does not do."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            # An OpenAI field sent as null is absent, however new the field (SDKs and proxies
            # send e.g. ``"reasoning_effort": null``); a misspelt one carries a value.
            if value is None:
                continue
            if name not in UNSUPPORTED_FIELDS and name not in IGNORED_FIELDS:
                raise APIError(400, f"unrecognized request argument supplied: {name}",
                               param=name, code="unknown_parameter")
        for name, neutral in UNSUPPORTED_FIELDS.items():
            # Compared with their types: ``logprobs: 0`` asks for the chosen tokens' logprobs.
            if name in extra and not any(extra[name] == v and type(extra[name]) is type(v)
                                         for v in neutral):
                raise APIError(400, f"{name}={extra[name]!r} is not supported by this server",
                               param=name, code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported by this server",
                           param="best_of", code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true",
                           param="stream_options")

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def max_tokens_param(self) -> str:
        """The field the request's token limit came from, for errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] = Field(
        description="Text, token ids, or one text in a list.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported; send several requests")
            v = v[0]
        if isinstance(v, str):
            # JSON's ``"\ud800"`` parses to a lone surrogate, which no tokenizer can encode.
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the prompt holds a lone surrogate (an unpaired \\ud800-"
                                 "\\udfff escape): it is not Unicode text") from None
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


def generation_limit(req: SamplingFields, is_chat: bool, prompt_tokens: int, context: int,
                     default: int) -> int:
    """The request's token limit: as asked, or the default cut to what the context leaves
    after the prompt (a request that asked for nothing gets what fits, as OpenAI's do); a 400
    when the prompt leaves no room for what was asked."""
    room = context - prompt_tokens
    asked = req.requested_max_tokens()
    if asked is None and room >= 1:
        return min(default, room)
    what = (f"{req.max_tokens_param()} is {asked}" if asked is not None
            else "that leaves none to generate")
    if asked is None or asked > room:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has "
                            f"{prompt_tokens} and {what}",
                       param="messages" if is_chat else "prompt", code="context_length_exceeded")
    return asked


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
