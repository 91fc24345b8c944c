"""Python client SDK for the s3d-serve OpenAI-compatible HTTP API.

This module owns the caller's side of the wire contract: the sync and async clients with their
openai-style resources (``completions``, ``chat.completions``, ``models``), the typed responses and
stream chunks, the typed errors, server-sent-event parsing and the retry policy. It depends only on
the standard library, httpx and pydantic, so it imports without torch or ray.

    with S3DClient("http://127.0.0.1:8000") as client:
        out = client.completions.create(prompt="Hello", max_tokens=16, arm="none")
        print(out.choices[0].text, out.spec_decode.mean_acceptance_length)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import functools
import itertools
import json
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, Literal, TypeVar, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "S3DClient",
    "AsyncS3DClient",
    "Completions",
    "Chat",
    "ChatCompletions",
    "Models",
    "AsyncCompletions",
    "AsyncChat",
    "AsyncChatCompletions",
    "AsyncModels",
    "Stream",
    "AsyncStream",
    "SpecDecode",
    "Usage",
    "CompletionChoice",
    "Completion",
    "ChatMessage",
    "ChatChoice",
    "ChatCompletion",
    "CompletionChunkChoice",
    "CompletionChunk",
    "ChatDelta",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "Model",
    "ModelList",
    "S3DError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "ServiceUnavailableError",
    "APIResponseValidationError",
    "APIConnectionError",
    "APITimeoutError",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# A non-streamed completion's answer comes only once generation ends, so reads wait long.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
_RETRY_STATUSES = frozenset({429, 503})
# Codes of the server's error events when it cannot take the request now: a 503 over HTTP.
_UNAVAILABLE_CODES = frozenset({"overloaded", "replica_unavailable"})
_MAX_RETRY_AFTER_S = 60.0
_MAX_BACKOFF_S = 8.0
_MAX_MESSAGE_CHARS = 1000

_Prompt = str | list[str] | list[int]  # one prompt per request, as the server takes
_Timeout = float | httpx.Timeout | None  # seconds for every phase, or httpx's per phase
_ResponseT = TypeVar("_ResponseT", bound=BaseModel)
_ChunkT = TypeVar("_ChunkT", bound=BaseModel)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow")


class SpecDecode(_Schema):
    """Acceptance statistics of one request under the speculative arm that served it."""

    arm: str
    depth: int | None = Field(default=None, description="Draft depth the request ran with.")
    mean_acceptance_length: float
    draft_acceptance_rate: float
    num_spec_steps: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_accepted_tokens_per_pos: list[int] = Field(default_factory=list)
    num_forward_passes: int | None = Field(
        default=None, description="Model passes of the decode steps: verify plus draft passes.")


class Usage(_Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Schema):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Schema):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    spec_decode: SpecDecode | None = None


class ChatMessage(_Schema):
    role: str
    content: str | None = None


class ChatChoice(_Schema):
    index: int
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Schema):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    spec_decode: SpecDecode | None = None


class CompletionChunkChoice(_Schema):
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None


class CompletionChunk(_Schema):
    """One streamed event; with ``include_usage`` the last one carries usage and spec_decode."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    spec_decode: SpecDecode | None = None


class ChatDelta(_Schema):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Schema):
    index: int
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Schema):
    """One streamed event; with ``include_usage`` the last one carries usage and spec_decode."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    spec_decode: SpecDecode | None = None


class Model(_Schema):
    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None


class ModelList(_Schema):
    object: str = "list"
    data: list[Model]


class S3DError(Exception):
    """Base of every error this SDK raises."""


class APIError(S3DError):
    """The server answered with an error: an HTTP error status, or an error event in a stream.

    ``status_code`` is the HTTP status; for an error event inside a stream (whose HTTP status was
    200) it is the event's ``code`` when that is an HTTP status, 503 for the codes the server
    sends when it cannot take the request now (``overloaded``, ``replica_unavailable``), else 500.

    In the openai package's terms this is ``APIStatusError``, and the classes by status below are
    related as openai's are; its ``APIError`` base is ``S3DError`` here. ``event`` is true for an
    error event.
    """

    def __init__(self, message: str, *, status_code: int, type: str | None = None,
                 param: str | None = None, code: str | int | None = None, body: Any = None,
                 event: bool = False):
        kind = f" ({type})" if type else ""
        if event:
            origin = "stream error event" if code is None else f"stream error event {code}"
        else:
            origin = f"HTTP {status_code}"
        super().__init__(f"{origin}{kind}: {message}")
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.event = event

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its fields, so it crosses processes (Ray tasks, process pools): the
        default calls the class with ``args`` alone, the formatted message."""
        rebuild = functools.partial(type(self), self.message, status_code=self.status_code,
                                    type=self.type, param=self.param, code=self.code,
                                    body=self.body, event=self.event)
        return rebuild, (), self.__dict__


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class UnprocessableEntityError(APIError):
    pass


class RateLimitError(APIError):
    pass


class InternalServerError(APIError):
    """Any 5xx, as the openai package maps them."""


class ServiceUnavailableError(InternalServerError):
    """503: overloaded, or no replica could serve the request. Retried (up to ``max_retries``)
    when it is the HTTP answer; not when it arrives as an error event in a stream, after data.
    An ``InternalServerError``, as openai's is for a 503: ``except InternalServerError`` in code
    written for that package catches it here too."""


class APIResponseValidationError(APIError):
    """The server's answer (or a stream event) is not what the API defines: not JSON, not of the
    expected shape, or an unexpected status such as a redirect."""


class APIConnectionError(S3DError):
    """The request or the stream failed in transport, without a usable answer from the server."""


class APITimeoutError(APIConnectionError):
    pass


_STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _error_message(body: Any, default: str) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            body = error.get("message")
        elif error is not None:
            body = error
        elif "detail" in body:  # FastAPI's own error shape, for routes outside the OpenAI handlers
            body = body["detail"]
    if isinstance(body, str):
        return body.strip()[:_MAX_MESSAGE_CHARS] or default
    return default if body is None else json.dumps(body)[:_MAX_MESSAGE_CHARS]


def _api_error(status_code: int, body: Any, default_message: str, *,
               event: bool = False) -> APIError:
    error = body.get("error") if isinstance(body, dict) else None
    fields = error if isinstance(error, dict) else {}
    cls = _STATUS_ERRORS.get(status_code) or (
        InternalServerError if status_code >= 500 else APIError)
    return cls(_error_message(body, default_message), status_code=status_code,
               type=fields.get("type"), param=fields.get("param"), code=fields.get("code"),
               body=body, event=event)


def _usable(response: httpx.Response, stream: bool) -> bool:
    """A success and, asked for a stream, an event stream (not a proxy's page or a JSON body)."""
    media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    return response.is_success and (not stream or media_type == "text/event-stream")


def _status_error(response: httpx.Response) -> APIError:
    """The error for a read response that ``_usable`` refused."""
    if response.is_success:  # a stream asked for, and something else answered
        what = (f"the content-type is {response.headers.get('content-type')!r}, not the "
                "text/event-stream of a stream")
    elif response.status_code < 400:  # a redirect (not followed) or other status outside the API
        what = f"unexpected HTTP status {response.status_code} {response.reason_phrase}".strip()
    else:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return _api_error(response.status_code, body, response.reason_phrase or "no error message")
    return APIResponseValidationError(what, status_code=response.status_code,
                                      body=response.text[:_MAX_MESSAGE_CHARS])


def _event_error(payload: dict[str, Any]) -> APIError:
    error = payload["error"]
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 600:
        status = code
    else:
        status = 503 if isinstance(code, str) and code in _UNAVAILABLE_CODES else 500
    return _api_error(status, payload, "no error message", event=True)


def _transport_error(exc: Exception) -> APIConnectionError:
    """An httpx request or stream error as this SDK's connection error."""
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__}: {exc}")


# httpx's errors once a request is under way: transport, decoding, redirects, and a stream
# closed under its reader (``Stream.close`` from another thread).
_HTTPX_ERRORS = (httpx.RequestError, httpx.StreamError)


def _retryable(exc: Exception) -> bool:
    """Transport failures before the request reached the server: sending again is safe."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


def _invalid(what: str, exc: Exception, status_code: int,
             body: str) -> APIResponseValidationError:
    """``body`` is the read answer's text, or a stream event's data (a stream's text is unread)."""
    return APIResponseValidationError(f"{what}: {exc}"[:_MAX_MESSAGE_CHARS],
                                      status_code=status_code, body=body[:_MAX_MESSAGE_CHARS])


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise _invalid("the answer is not JSON", exc, response.status_code, response.text) from exc


def _parse(response: httpx.Response, model: type[_ResponseT]) -> _ResponseT:
    body = _json(response)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(f"the answer is not a {model.__name__}", exc, response.status_code,
                       response.text) from exc


def _retry_delay(response: httpx.Response | None, attempt: int) -> float:
    """Seconds to wait before retry number ``attempt + 1``: Retry-After, else jittered backoff."""
    if response is not None:
        seconds = _retry_after_s(response.headers.get("retry-after", ""))
        if seconds is not None:
            return min(seconds, _MAX_RETRY_AFTER_S)
    return min(0.5 * 2**attempt, _MAX_BACKOFF_S) * (1 - 0.25 * random.random())


def _retry_after_s(value: str) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP-date; None if neither."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        return max(seconds, 0.0)
    return seconds if seconds >= 0 else None


def _normalise_base_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def _http_options(base_url: str, api_key: str | None, timeout: _Timeout) -> dict[str, Any]:
    key = api_key if api_key is not None else os.environ.get("S3D_API_KEY")
    return {"base_url": base_url, "timeout": httpx.Timeout(timeout),
            "headers": {"Authorization": f"Bearer {key}"} if key else {}}


def _call_timeout(timeout: _Timeout) -> Any:
    """A call's own timeout; None keeps the client's."""
    return httpx.USE_CLIENT_DEFAULT if timeout is None else httpx.Timeout(timeout)


def _body(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _model_path(model: str) -> str:
    return f"/v1/models/{quote(model, safe='')}"


def _shutdown(response: httpx.Response) -> None:
    """Shuts down the socket under ``response``: a thread blocked reading it wakes up, and the
    server sees the connection end (closing the socket from another thread does neither).
    Transports without a socket (``httpx.MockTransport``) have nothing to shut down."""
    network_stream = response.extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already shut down or closed
            sock.shutdown(socket.SHUT_RDWR)


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class _SSEDecoder:
    """Server-sent events from the bytes of a body as they arrive: an event's ``data:`` lines
    joined by newlines, dispatched at the blank line that ends it; comments, other fields and a
    leading BOM are skipped.

    Lines end at CR LF, LF or CR only, as the format defines: httpx's ``iter_lines`` breaks them
    as ``str.splitlines`` does, at U+2028, U+0085 and the like too, which cut an event whose JSON
    carries one raw in two. Each line is decoded as UTF-8 once whole, so a character split
    between chunks arrives whole.
    """

    def __init__(self) -> None:
        self.pending = b""  # the start of a line whose end has not arrived
        self.after_cr = False  # the last chunk ended in CR: an LF starting the next is its pair
        self.data: list[str] = []
        self.first = True

    def feed(self, chunk: bytes) -> list[str]:
        """The data of each event this chunk of the body completes."""
        if not chunk:
            return []
        if self.after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self.after_cr = chunk.endswith(b"\r")
        *lines, self.pending = _LINE_BREAK.split(self.pending + chunk)
        completed = (self._line(line.decode("utf-8", "replace")) for line in lines)
        return [data for data in completed if data is not None]

    def end(self) -> list[str]:
        """The event the body ended in the middle of: a last line without its line break, an
        event without the blank line after it."""
        return self.feed(b"\n\n")

    def _line(self, line: str) -> str | None:
        if self.first:
            line, self.first = line.removeprefix("\ufeff"), False
        if not line:
            data, self.data = self.data, []
            return "\n".join(data) if data else None
        field, _, value = line.partition(":")
        if field == "data":
            self.data.append(value.removeprefix(" "))
        return None


def _decode_event(data: str, chunk_type: type[_ChunkT], status_code: int) -> _ChunkT:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise _invalid("a stream event is not JSON", exc, status_code, data) from exc
    if isinstance(payload, dict) and payload.get("error"):  # "error": null is no error (openai)
        raise _event_error(payload)
    try:
        return chunk_type.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(f"a stream event is not a {chunk_type.__name__}", exc, status_code,
                       data) from exc


_NO_DONE = "the stream ended without data: [DONE]"


def _events(response: httpx.Response, chunk_type: type[_ChunkT]) -> Iterator[_ChunkT]:
    """A stream's chunks. A function, not a method of ``Stream``: a generator referring to its
    stream would make a cycle, and an abandoned stream's response would wait for the cyclic GC."""
    events = _SSEDecoder()
    try:
        for chunk in itertools.chain(response.iter_bytes(), [None]):
            for data in events.end() if chunk is None else events.feed(chunk):
                if data == "[DONE]":
                    return
                yield _decode_event(data, chunk_type, response.status_code)
        raise APIConnectionError(_NO_DONE)
    except _HTTPX_ERRORS as exc:
        raise _transport_error(exc) from exc
    finally:
        response.close()


async def _aevents(response: httpx.Response, chunk_type: type[_ChunkT]) -> AsyncIterator[_ChunkT]:
    """An async stream's chunks; a function for the reason ``_events`` is."""
    events = _SSEDecoder()
    try:
        async for chunk in response.aiter_bytes():
            for data in events.feed(chunk):
                if data == "[DONE]":
                    return
                yield _decode_event(data, chunk_type, response.status_code)
        for data in events.end():
            if data == "[DONE]":
                return
            yield _decode_event(data, chunk_type, response.status_code)
        raise APIConnectionError(_NO_DONE)
    except _HTTPX_ERRORS as exc:
        raise _transport_error(exc) from exc
    finally:
        await response.aclose()


class Stream(Generic[_ChunkT]):
    """Iterator of typed chunks from a server-sent-events response.

    Closing it (or leaving its ``with`` block) closes the HTTP response; so does reaching
    ``data: [DONE]`` or an error, and so does dropping the last reference to it (after ``break``
    in a bare ``for`` loop, or before iterating at all).
    """

    def __init__(self, response: httpx.Response, chunk_type: type[_ChunkT]):
        self.response = response
        self._iterator = _events(response, chunk_type)

    def __iter__(self) -> Stream[_ChunkT]:
        return self

    def __next__(self) -> _ChunkT:
        return next(self._iterator)

    def close(self) -> None:
        """Shuts the connection down and closes the response first: from another thread, the
        reader then stops with an ``APIConnectionError`` (closing its generator while it runs
        would fail)."""
        if not self.response.is_closed:  # a finished response's connection may serve another
            _shutdown(self.response)
        self.response.close()
        with contextlib.suppress(ValueError):  # "generator already executing" elsewhere
            self._iterator.close()

    def __del__(self) -> None:
        """Closes the response: a generator never started never runs its ``finally``, so a
        stream dropped before its loop would keep its connection and the server decoding."""
        response = getattr(self, "response", None)  # absent if ``__init__`` failed
        if response is not None:
            response.close()

    def __enter__(self) -> Stream[_ChunkT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream(Generic[_ChunkT]):
    """Async iterator of typed chunks from a server-sent-events response.

    Closing it (``aclose`` or leaving its ``async with`` block) closes the HTTP response; so does
    reaching ``data: [DONE]`` or an error. Use it with ``async with`` (or call ``aclose()``):
    dropped unclosed, its response is closed only by the event loop's finaliser of an abandoned
    generator if it was iterated, and not at all (until the client closes) if it never was,
    because ``__del__`` cannot await.
    """

    def __init__(self, response: httpx.Response, chunk_type: type[_ChunkT]):
        self.response = response
        self._iterator = _aevents(response, chunk_type)

    def __aiter__(self) -> AsyncStream[_ChunkT]:
        return self

    async def __anext__(self) -> _ChunkT:
        return await anext(self._iterator)

    async def aclose(self) -> None:
        """Closes the response first: from another task, the reader then stops with an
        ``APIConnectionError`` (closing its generator while it runs would fail)."""
        await self.response.aclose()
        with contextlib.suppress(RuntimeError):  # "asynchronous generator is already running"
            await self._iterator.aclose()

    async def __aenter__(self) -> AsyncStream[_ChunkT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class S3DClient:
    """Synchronous client; ``base_url`` may end in ``/v1`` or not.

    ``api_key`` defaults to the ``S3D_API_KEY`` environment variable. ``transport`` replaces the
    network (tests pass ``httpx.MockTransport``); ``sleep`` is what waits between retries.
    ``timeout`` is seconds or an ``httpx.Timeout``; ``create()`` takes its own per call.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: _Timeout = DEFAULT_TIMEOUT, max_retries: int = 3, *,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = _normalise_base_url(base_url)
        self.max_retries = max_retries
        self._sleep = sleep
        self._http = httpx.Client(transport=transport,
                                  **_http_options(self.base_url, api_key, timeout))
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                 stream: bool = False, timeout: _Timeout = None,
                 headers: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None) -> httpx.Response:
        """Send with retries; only the initial response is retried, never a started stream."""
        request = self._http.build_request(method, path, json=body, headers=headers,
                                           params=params, timeout=_call_timeout(timeout))
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
                if not _usable(response, stream):
                    response.read()  # a stream's body is still unread
            except httpx.RequestError as exc:
                if not _retryable(exc) or attempt >= self.max_retries:
                    raise _transport_error(exc) from exc
                response = None
            else:
                if _usable(response, stream):
                    return response
                if response.status_code not in _RETRY_STATUSES or attempt >= self.max_retries:
                    raise _status_error(response)
            self._sleep(_retry_delay(response, attempt))
            attempt += 1

    def _post(self, path: str, body: dict[str, Any], stream: bool, timeout: _Timeout,
              response_type: type[_ResponseT], chunk_type: type[_ChunkT], *,
              headers: dict[str, str] | None,
              params: dict[str, Any] | None) -> _ResponseT | Stream[_ChunkT]:
        response = self._request("POST", path, body, stream=stream, timeout=timeout,
                                 headers=headers, params=params)
        if stream:
            return Stream(response, chunk_type)
        return _parse(response, response_type)

    def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return _json(self._request("GET", "/healthz"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> S3DClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncS3DClient:
    """Asynchronous client; ``base_url`` may end in ``/v1`` or not.

    ``api_key`` defaults to the ``S3D_API_KEY`` environment variable. ``transport`` replaces the
    network (tests pass ``httpx.MockTransport``); ``sleep`` is what waits between retries.
    ``timeout`` is seconds or an ``httpx.Timeout``; ``create()`` takes its own per call.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: _Timeout = DEFAULT_TIMEOUT, max_retries: int = 3, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.base_url = _normalise_base_url(base_url)
        self.max_retries = max_retries
        self._sleep = sleep
        self._http = httpx.AsyncClient(transport=transport,
                                       **_http_options(self.base_url, api_key, timeout))
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                       stream: bool = False, timeout: _Timeout = None,
                       headers: dict[str, str] | None = None,
                       params: dict[str, Any] | None = None) -> httpx.Response:
        """Send with retries; only the initial response is retried, never a started stream."""
        request = self._http.build_request(method, path, json=body, headers=headers,
                                           params=params, timeout=_call_timeout(timeout))
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
                if not _usable(response, stream):
                    await response.aread()  # a stream's body is still unread
            except httpx.RequestError as exc:
                if not _retryable(exc) or attempt >= self.max_retries:
                    raise _transport_error(exc) from exc
                response = None
            else:
                if _usable(response, stream):
                    return response
                if response.status_code not in _RETRY_STATUSES or attempt >= self.max_retries:
                    raise _status_error(response)
            await self._sleep(_retry_delay(response, attempt))
            attempt += 1

    async def _post(self, path: str, body: dict[str, Any], stream: bool, timeout: _Timeout,
                    response_type: type[_ResponseT], chunk_type: type[_ChunkT], *,
                    headers: dict[str, str] | None,
                    params: dict[str, Any] | None) -> _ResponseT | AsyncStream[_ChunkT]:
        response = await self._request("POST", path, body, stream=stream, timeout=timeout,
                                       headers=headers, params=params)
        if stream:
            return AsyncStream(response, chunk_type)
        return _parse(response, response_type)

    async def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return _json(await self._request("GET", "/healthz"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncS3DClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Completions:
    def __init__(self, client: S3DClient):
        self._client = client

    @overload
    def create(self, *, prompt: _Prompt, model: str | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: str | list[str] | None = None, n: int | None = None,
               stream: Literal[False] = False, stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> Completion: ...

    @overload
    def create(self, *, prompt: _Prompt, model: str | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: str | list[str] | None = None, n: int | None = None,
               stream: Literal[True], stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> Stream[CompletionChunk]: ...

    @overload
    def create(self, *, prompt: _Prompt, model: str | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: str | list[str] | None = None, n: int | None = None,
               stream: bool, stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> Completion | Stream[CompletionChunk]: ...

    def create(self, *, prompt: _Prompt, model: str | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: str | list[str] | None = None, n: int | None = None,
               stream: bool = False, stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> Completion | Stream[CompletionChunk]:
        """POST /v1/completions; ``arm`` pins the speculative arm, ``extra`` adds body fields,
        ``timeout`` replaces the client's for this call. ``extra_body`` (merged over the body),
        ``extra_headers`` and ``extra_query`` are the openai package's, for code ported from it."""
        body = _body(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                     top_p=top_p, seed=seed, stop=stop, n=n, stream=stream,
                     stream_options=stream_options, arm=arm, **extra) | (extra_body or {})
        return self._client._post("/v1/completions", body, stream, timeout, Completion,
                                  CompletionChunk, headers=extra_headers, params=extra_query)


class ChatCompletions:
    def __init__(self, client: S3DClient):
        self._client = client

    @overload
    def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, n: int | None = None,
               stream: Literal[False] = False, stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> ChatCompletion: ...

    @overload
    def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, n: int | None = None,
               stream: Literal[True], stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> Stream[ChatCompletionChunk]: ...

    @overload
    def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, n: int | None = None,
               stream: bool, stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> ChatCompletion | Stream[ChatCompletionChunk]: ...

    def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, n: int | None = None,
               stream: bool = False, stream_options: dict[str, Any] | None = None,
               arm: str | None = None, timeout: _Timeout = None,
               extra_headers: dict[str, str] | None = None,
               extra_query: dict[str, Any] | None = None,
               extra_body: dict[str, Any] | None = None,
               **extra: Any) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """POST /v1/chat/completions; ``arm`` pins the speculative arm, ``extra`` adds body fields,
        ``timeout`` replaces the client's for this call. ``extra_body`` (merged over the body),
        ``extra_headers`` and ``extra_query`` are the openai package's, for code ported from it."""
        body = _body(model=model, messages=messages, max_tokens=max_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, stop=stop, n=n,
                     stream=stream, stream_options=stream_options, arm=arm,
                     **extra) | (extra_body or {})
        return self._client._post("/v1/chat/completions", body, stream, timeout, ChatCompletion,
                                  ChatCompletionChunk, headers=extra_headers, params=extra_query)


class Chat:
    def __init__(self, client: S3DClient):
        self.completions = ChatCompletions(client)


class Models:
    def __init__(self, client: S3DClient):
        self._client = client

    def list(self) -> ModelList:
        """GET /v1/models."""
        return _parse(self._client._request("GET", "/v1/models"), ModelList)

    def retrieve(self, model: str) -> Model:
        """GET /v1/models/{model}."""
        return _parse(self._client._request("GET", _model_path(model)), Model)


class AsyncCompletions:
    def __init__(self, client: AsyncS3DClient):
        self._client = client

    @overload
    async def create(self, *, prompt: _Prompt, model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: Literal[False] = False, stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> Completion: ...

    @overload
    async def create(self, *, prompt: _Prompt, model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: Literal[True], stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> AsyncStream[CompletionChunk]: ...

    @overload
    async def create(self, *, prompt: _Prompt, model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: bool, stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> Completion | AsyncStream[CompletionChunk]: ...

    async def create(self, *, prompt: _Prompt, model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: bool = False, stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> Completion | AsyncStream[CompletionChunk]:
        """POST /v1/completions; ``arm`` pins the speculative arm, ``extra`` adds body fields,
        ``timeout`` replaces the client's for this call. ``extra_body`` (merged over the body),
        ``extra_headers`` and ``extra_query`` are the openai package's, for code ported from it."""
        body = _body(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                     top_p=top_p, seed=seed, stop=stop, n=n, stream=stream,
                     stream_options=stream_options, arm=arm, **extra) | (extra_body or {})
        return await self._client._post("/v1/completions", body, stream, timeout, Completion,
                                         CompletionChunk, headers=extra_headers,
                                         params=extra_query)


class AsyncChatCompletions:
    def __init__(self, client: AsyncS3DClient):
        self._client = client

    @overload
    async def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: Literal[False] = False, stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> ChatCompletion: ...

    @overload
    async def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: Literal[True], stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> AsyncStream[ChatCompletionChunk]: ...

    @overload
    async def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: bool, stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> ChatCompletion | AsyncStream[ChatCompletionChunk]: ...

    async def create(self, *, messages: list[dict[str, Any]], model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, n: int | None = None,
                     stream: bool = False, stream_options: dict[str, Any] | None = None,
                     arm: str | None = None, timeout: _Timeout = None,
                     extra_headers: dict[str, str] | None = None,
                     extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None,
                     **extra: Any) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """POST /v1/chat/completions; ``arm`` pins the speculative arm, ``extra`` adds body fields,
        ``timeout`` replaces the client's for this call. ``extra_body`` (merged over the body),
        ``extra_headers`` and ``extra_query`` are the openai package's, for code ported from it."""
        body = _body(model=model, messages=messages, max_tokens=max_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, stop=stop, n=n,
                     stream=stream, stream_options=stream_options, arm=arm,
                     **extra) | (extra_body or {})
        return await self._client._post("/v1/chat/completions", body, stream, timeout,
                                         ChatCompletion, ChatCompletionChunk,
                                         headers=extra_headers, params=extra_query)


class AsyncChat:
    def __init__(self, client: AsyncS3DClient):
        self.completions = AsyncChatCompletions(client)


class AsyncModels:
    def __init__(self, client: AsyncS3DClient):
        self._client = client

    async def list(self) -> ModelList:
        """GET /v1/models."""
        return _parse(await self._client._request("GET", "/v1/models"), ModelList)

    async def retrieve(self, model: str) -> Model:
        """GET /v1/models/{model}."""
        return _parse(await self._client._request("GET", _model_path(model)), Model)
