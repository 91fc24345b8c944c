"""Unit tests of the client SDK over httpx.MockTransport: bodies, parsing, SSE, errors, retries."""

import asyncio
import datetime
import email.utils
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from serve_app.client import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    AsyncS3DClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    S3DClient,
    ServiceUnavailableError,
    UnprocessableEntityError,
)

SPEC = {
    "arm": "skip12-17",
    "mean_acceptance_length": 2.5,
    "draft_acceptance_rate": 0.75,
    "num_spec_steps": 4,
    "num_drafts": 4,
    "num_draft_tokens": 8,
    "num_accepted_tokens": 6,
    "num_accepted_tokens_per_pos": [4, 2],
}
USAGE = {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
COMPLETION = {
    "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny",
    "choices": [{"index": 0, "text": " world", "finish_reason": "length", "logprobs": None}],
    "usage": USAGE, "spec_decode": SPEC, "system_fingerprint": "s3d",
}
CHAT = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "tiny",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                 "finish_reason": "stop"}],
    "usage": USAGE, "spec_decode": SPEC,
}


def completion_chunk(text, finish_reason=None, **fields):
    return {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny",
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}], **fields}


def chat_chunk(delta, finish_reason=None):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def usage_chunk(obj):
    return {"id": "x", "object": obj, "created": 1700000000, "model": "tiny", "choices": [],
            "usage": USAGE, "spec_decode": SPEC}


def sse(*events):
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return httpx.Response(200, content="".join(lines).encode(),
                          headers={"content-type": "text/event-stream"})


def error(status, message="nope", type_="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return httpx.Response(status, json=body, headers=headers)


class Server:
    """MockTransport handler answering queued responses (or raising queued errors) in order."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request):
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, i=0):
        return json.loads(self.requests[i].content)


def client_for(server, base_url="http://test", **kwargs):
    sleeps = []
    client = S3DClient(base_url, transport=httpx.MockTransport(server), sleep=sleeps.append,
                       **kwargs)
    return client, sleeps


def async_client_for(server, **kwargs):
    sleeps = []

    async def sleep(seconds):
        sleeps.append(seconds)

    client = AsyncS3DClient("http://test", transport=httpx.MockTransport(server), sleep=sleep,
                            **kwargs)
    return client, sleeps


def test_completion_body_omits_none_and_parses_spec_decode():
    server = Server(httpx.Response(200, json=COMPLETION))
    client, _ = client_for(server)
    with client:
        out = client.completions.create(prompt="Hello", max_tokens=8, temperature=0.0, seed=0,
                                        arm="skip12-17", ignore_eos=True)
    request = server.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/completions")
    assert server.body() == {"prompt": "Hello", "max_tokens": 8, "temperature": 0.0, "seed": 0,
                             "stream": False, "arm": "skip12-17", "ignore_eos": True}
    assert isinstance(out, Completion)
    assert out.choices[0].text == " world" and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == 13
    assert out.spec_decode.arm == "skip12-17"
    assert out.spec_decode.mean_acceptance_length == 2.5
    assert out.spec_decode.num_accepted_tokens_per_pos == [4, 2]
    assert out.system_fingerprint == "s3d"


def test_chat_body_and_parsing():
    server = Server(httpx.Response(200, json=CHAT))
    client, _ = client_for(server)
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, top_p=0.9,
                                         stop=["\n"], n=1)
    assert server.requests[0].url.path == "/v1/chat/completions"
    assert server.body() == {"model": "tiny", "messages": messages, "top_p": 0.9, "stop": ["\n"],
                             "n": 1, "stream": False}
    assert isinstance(out, ChatCompletion)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "Hi!"
    assert out.spec_decode.num_draft_tokens == 8


def test_spec_decode_defaults_and_unknown_fields():
    spec = {k: v for k, v in SPEC.items() if k != "num_accepted_tokens_per_pos"}
    server = Server(httpx.Response(200, json={**COMPLETION, "spec_decode": {**spec, "new": 1}}))
    out = client_for(server)[0].completions.create(prompt="x")
    assert out.spec_decode.num_accepted_tokens_per_pos == []
    assert out.spec_decode.model_extra == {"new": 1}


def test_models_and_health():
    models = {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "s3d"}]}
    server = Server(httpx.Response(200, json=models), httpx.Response(200, json={"status": "ok"}))
    client, _ = client_for(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.health() == {"status": "ok"}
    assert [(r.method, r.url.path) for r in server.requests] == [
        ("GET", "/v1/models"), ("GET", "/healthz")]


def test_sync_completion_stream_with_usage_and_done():
    server = Server(sse(completion_chunk("Hel"), completion_chunk("lo", "length"),
                        usage_chunk("text_completion"), "[DONE]"))
    client, _ = client_for(server)
    stream = client.completions.create(prompt="x", stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert server.body()["stream"] is True
    assert server.body()["stream_options"] == {"include_usage": True}
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "Hello"
    assert chunks[1].choices[0].finish_reason == "length"
    assert chunks[0].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].spec_decode.arm == "skip12-17"
    assert stream.response.is_closed


def test_sse_ignores_comments_and_other_fields():
    body = (": keep-alive\n\nevent: message\ndata:" + json.dumps(chat_chunk({"content": "a"}))
            + "\n\ndata: [DONE]\n\n")
    server = Server(httpx.Response(200, content=body.encode()))
    chunks = list(client_for(server)[0].chat.completions.create(messages=[], stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["a"]


def test_stream_close_closes_the_response():
    server = Server(sse(completion_chunk("a"), completion_chunk("b"), "[DONE]"))
    with client_for(server)[0].completions.create(prompt="x", stream=True) as stream:
        assert next(stream).choices[0].text == "a"
    assert stream.response.is_closed


def test_stream_without_done_is_a_connection_error():
    server = Server(sse(completion_chunk("a")))
    stream = client_for(server)[0].completions.create(prompt="x", stream=True)
    assert next(stream).choices[0].text == "a"
    with pytest.raises(APIConnectionError, match="DONE"):
        next(stream)


@pytest.mark.parametrize(("error_event", "cls", "status"), [
    ({"message": "replica died", "type": "internal_server_error", "param": None, "code": 503},
     ServiceUnavailableError, 503),
    ({"message": "replica died", "type": "internal_server_error"}, InternalServerError, 500),
])
def test_error_event_mid_stream_raises(error_event, cls, status):
    server = Server(sse(completion_chunk("a"), {"error": error_event}, "[DONE]"))
    stream = client_for(server)[0].completions.create(prompt="x", stream=True)
    assert next(stream).choices[0].text == "a"
    with pytest.raises(cls) as info:
        next(stream)
    assert info.value.status_code == status
    assert info.value.message == "replica died"
    assert info.value.type == "internal_server_error"
    assert stream.response.is_closed


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
    (404, NotFoundError), (422, UnprocessableEntityError), (429, RateLimitError),
    (503, ServiceUnavailableError), (502, InternalServerError), (409, APIError),
])
def test_error_mapping(status, cls):
    server = Server(error(status, message=f"bad {status}"))
    client, sleeps = client_for(server, max_retries=0)
    with pytest.raises(cls) as info:
        client.completions.create(prompt="x")
    err = info.value
    assert type(err) is cls
    assert (err.status_code, err.message, err.type) == (status, f"bad {status}",
                                                       "invalid_request_error")
    assert err.param is None and err.code is None
    assert err.body["error"]["message"] == f"bad {status}"
    assert f"bad {status}" in str(err)
    assert sleeps == []


def test_non_json_500_is_not_retried():
    server = Server(httpx.Response(500, text="upstream exploded\n"))
    client, sleeps = client_for(server)
    with pytest.raises(InternalServerError) as info:
        client.completions.create(prompt="x")
    assert info.value.message == "upstream exploded"
    assert info.value.body == "upstream exploded\n"
    assert info.value.type is None
    assert len(server.requests) == 1 and sleeps == []


def test_empty_and_fastapi_error_bodies():
    server = Server(httpx.Response(502), httpx.Response(404, json={"detail": "Not Found"}))
    client, _ = client_for(server)
    with pytest.raises(InternalServerError, match="Bad Gateway"):
        client.health()
    with pytest.raises(NotFoundError) as info:
        client.health()
    assert info.value.message == "Not Found"


def test_error_on_stream_request_reads_the_body():
    server = Server(error(400, message="max_tokens too large"))
    with pytest.raises(BadRequestError, match="max_tokens too large"):
        client_for(server)[0].completions.create(prompt="x", stream=True)


def test_retries_honour_retry_after():
    server = Server(error(503, headers={"Retry-After": "2"}),
                    error(429, headers={"Retry-After": "0.5"}),
                    httpx.Response(200, json=COMPLETION))
    client, sleeps = client_for(server)
    assert client.completions.create(prompt="x").id == "cmpl-1"
    assert sleeps == [2.0, 0.5]
    assert len(server.requests) == 3


def test_retry_after_cap_dates_and_backoff_fallback():
    soon = email.utils.format_datetime(
        datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5),
        usegmt=True)
    server = Server(error(503, headers={"Retry-After": "3600"}),
                    error(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
                    error(503, headers={"Retry-After": soon}),
                    error(503, headers={"Retry-After": "soon"}),
                    error(503),
                    httpx.Response(200, json=COMPLETION))
    client, sleeps = client_for(server, max_retries=5)
    client.completions.create(prompt="x")
    assert sleeps[0] == 60.0
    assert sleeps[1] == 0.0  # an HTTP-date in the past: now
    assert 3.0 <= sleeps[2] <= 5.0  # an HTTP-date 5 s ahead (whole seconds)
    assert 3.0 <= sleeps[3] <= 4.0  # unreadable: 0.5 * 2**3 with up to 25% jitter
    assert 6.0 <= sleeps[4] <= 8.0


def test_backoff_is_capped():
    server = Server(*[error(503) for _ in range(7)])
    client, sleeps = client_for(server, max_retries=6)
    with pytest.raises(ServiceUnavailableError):
        client.health()
    assert 6.0 <= sleeps[-1] <= 8.0 and 6.0 <= sleeps[-2] <= 8.0


def test_gives_up_after_max_retries():
    server = Server(*[error(503, message="overloaded", headers={"Retry-After": "1"})
                      for _ in range(3)])
    client, sleeps = client_for(server, max_retries=2)
    with pytest.raises(ServiceUnavailableError, match="overloaded"):
        client.completions.create(prompt="x")
    assert len(server.requests) == 3 and sleeps == [1.0, 1.0]


def test_connect_errors_are_retried_then_raised():
    server = Server(*[httpx.ConnectError("connection refused") for _ in range(3)])
    client, sleeps = client_for(server, max_retries=2)
    with pytest.raises(APIConnectionError, match="connection refused") as info:
        client.health()
    assert not isinstance(info.value, APITimeoutError)
    assert len(server.requests) == 3 and len(sleeps) == 2

    server = Server(httpx.ConnectError("connection refused"), httpx.Response(200, json=CHAT))
    client, sleeps = client_for(server)
    assert client.chat.completions.create(messages=[]).id == "chatcmpl-1"
    assert len(sleeps) == 1 and 0.375 <= sleeps[0] <= 0.5


def test_timeouts_are_not_retried():
    server = Server(httpx.ReadTimeout("timed out"))
    client, sleeps = client_for(server)
    with pytest.raises(APITimeoutError):
        client.completions.create(prompt="x")
    assert len(server.requests) == 1 and sleeps == []


def test_stream_retried_before_it_starts():
    server = Server(error(503, headers={"Retry-After": "0"}),
                    sse(completion_chunk("a"), "[DONE]"))
    client, sleeps = client_for(server)
    chunks = list(client.completions.create(prompt="x", stream=True))
    assert [c.choices[0].text for c in chunks] == ["a"]
    assert sleeps == [0.0]


def test_api_key_header(monkeypatch):
    monkeypatch.delenv("S3D_API_KEY", raising=False)
    server = Server(*[httpx.Response(200, json={}) for _ in range(3)])
    client_for(server)[0].health()
    client_for(server, api_key="sk-given")[0].health()
    monkeypatch.setenv("S3D_API_KEY", "sk-env")
    client_for(server)[0].health()
    assert [r.headers.get("authorization") for r in server.requests] == [
        None, "Bearer sk-given", "Bearer sk-env"]


def test_timeout_is_applied():
    server = Server(httpx.Response(200, json={}))
    client_for(server, timeout=5.0)[0].health()
    assert server.requests[0].extensions["timeout"] == httpx.Timeout(5.0).as_dict()


@pytest.mark.parametrize("base_url", [
    "http://test:8000", "http://test:8000/", "http://test:8000/v1", "http://test:8000/v1/"])
def test_base_url_normalisation(base_url):
    server = Server(httpx.Response(200, json=COMPLETION))
    client, _ = client_for(server, base_url=base_url)
    client.completions.create(prompt="x")
    assert client.base_url == "http://test:8000"
    assert str(server.requests[0].url) == "http://test:8000/v1/completions"


def test_async_client_requests_and_streams():
    server = Server(error(503, headers={"Retry-After": "3"}),
                    httpx.Response(200, json=CHAT),
                    sse(chat_chunk({"role": "assistant", "content": ""}),
                        chat_chunk({"content": "Hi"}), chat_chunk({}, "stop"),
                        usage_chunk("chat.completion.chunk"), "[DONE]"),
                    httpx.Response(200, json={"object": "list", "data": [{"id": "tiny"}]}))

    async def main():
        client, sleeps = async_client_for(server)
        async with client:
            out = await client.chat.completions.create(messages=[{"role": "user", "content": "x"}],
                                                       arm="none")
            async with await client.chat.completions.create(
                    messages=[], stream=True, stream_options={"include_usage": True}) as stream:
                chunks = [c async for c in stream]
            models = await client.models.list()
        return out, chunks, stream, models, sleeps

    out, chunks, stream, models, sleeps = asyncio.run(main())
    assert sleeps == [3.0]
    assert server.body(0)["arm"] == "none" and "model" not in server.body(0)
    assert isinstance(out, ChatCompletion) and out.spec_decode.arm == "skip12-17"
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Hi"
    assert chunks[2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.total_tokens == 13 and chunks[-1].spec_decode.num_drafts == 4
    assert stream.response.is_closed
    assert [m.id for m in models.data] == ["tiny"]


def test_async_completion_stream_and_error_event():
    server = Server(sse(completion_chunk("a"), completion_chunk("b", "stop"), "[DONE]"),
                    sse(completion_chunk("a"),
                        {"error": {"message": "replica died", "type": "internal_server_error",
                                   "param": None, "code": 500}}))

    async def main():
        client, _ = async_client_for(server)
        async with client:
            texts = [c.choices[0].text
                     async for c in await client.completions.create(prompt="x", stream=True)]
            stream = await client.completions.create(prompt="x", stream=True)
            first = await anext(stream)
            with pytest.raises(InternalServerError, match="replica died"):
                await anext(stream)
        return texts, first, stream

    texts, first, stream = asyncio.run(main())
    assert texts == ["a", "b"]
    assert first.choices[0].text == "a"
    assert stream.response.is_closed


def test_async_errors_and_retries():
    server = Server(*[httpx.ConnectError("connection refused") for _ in range(2)],
                    error(404, message="no such model"),
                    *[httpx.ConnectTimeout("timed out") for _ in range(2)])

    async def main():
        client, sleeps = async_client_for(server, max_retries=1)
        async with client:
            with pytest.raises(APIConnectionError):
                await client.health()
            with pytest.raises(NotFoundError, match="no such model"):
                await client.completions.create(model="missing", prompt="x")
            with pytest.raises(APITimeoutError):
                await client.health()
        return sleeps

    sleeps = asyncio.run(main())
    # connection refused and connect timeouts (nothing sent) are retried once each
    assert len(sleeps) == 2 and len(server.requests) == 5


def test_answers_outside_the_api_raise_typed_errors():
    """A proxy's HTML page, an unexpected redirect, a body or event of the wrong shape: each an
    APIResponseValidationError, never a raw JSON or pydantic error."""
    html = httpx.Response(200, text="<html>gateway</html>")
    server = Server(html, httpx.Response(307, headers={"Location": "/elsewhere"}),
                    httpx.Response(200, json={"id": "c"}), sse("{not json"),
                    sse({"id": "c"}), httpx.Response(200, text="up"))
    client, _ = client_for(server)
    with pytest.raises(APIResponseValidationError, match="not JSON") as info:
        client.completions.create(prompt="x")
    assert info.value.status_code == 200 and "gateway" in info.value.body
    with pytest.raises(APIResponseValidationError) as info:
        client.completions.create(prompt="x")
    assert info.value.status_code == 307
    with pytest.raises(APIResponseValidationError, match="not a Completion"):
        client.completions.create(prompt="x")
    with pytest.raises(APIResponseValidationError, match="not JSON"):
        list(client.completions.create(prompt="x", stream=True))
    with pytest.raises(APIResponseValidationError, match="not a CompletionChunk"):
        list(client.completions.create(prompt="x", stream=True))
    with pytest.raises(APIResponseValidationError):
        client.health()


def test_sse_events_span_lines_and_end_at_blank_lines():
    chunk = json.dumps(completion_chunk("a"), indent=1).splitlines()
    body = ("\ufeff: comment\r\n" + "".join(f"data: {line}\r\n" for line in chunk) + "\r\n"
            + "data: [DONE]\n\n")
    server = Server(httpx.Response(200, content=body.encode()))
    client, _ = client_for(server)
    assert [c.choices[0].text for c in client.completions.create(prompt="x", stream=True)] == [
        "a"]
    # the last event without its blank line still counts
    server = Server(httpx.Response(200, content=f"data: {json.dumps(completion_chunk('b'))}\n\n"
                                                "data: [DONE]".encode()))
    client, _ = client_for(server)
    assert [c.choices[0].text for c in client.completions.create(prompt="x", stream=True)] == [
        "b"]


def test_decoding_errors_are_typed():
    server = Server(httpx.DecodingError("bad gzip"))
    client, sleeps = client_for(server)
    with pytest.raises(APIConnectionError, match="bad gzip"):
        client.health()
    assert sleeps == []


class _SlowBody(httpx.SyncByteStream):
    """One event, then a wait until closed."""

    def __init__(self):
        self.closed = threading.Event()

    def __iter__(self):
        yield f"data: {json.dumps(completion_chunk('a'))}\n\n".encode()
        self.closed.wait(10)
        yield b""

    def close(self):
        self.closed.set()


def test_stream_closed_from_another_thread_stops_its_reader():
    body = _SlowBody()
    server = Server(httpx.Response(200, stream=body))
    client, _ = client_for(server)
    stream = client.completions.create(prompt="x", stream=True)
    assert next(stream).choices[0].text == "a"
    outcome = []

    def read():
        try:
            next(stream)
        except Exception as exc:  # noqa: BLE001 - what the reader meets is the point
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    stream.close()  # while the reader waits in next()
    reader.join(10)
    assert not reader.is_alive() and stream.response.is_closed and body.closed.is_set()
    assert outcome and isinstance(outcome[0], (APIConnectionError, StopIteration)), outcome


class _SlowAsyncBody(httpx.AsyncByteStream):
    def __init__(self):
        self.closed = asyncio.Event()

    async def __aiter__(self):
        yield f"data: {json.dumps(completion_chunk('a'))}\n\n".encode()
        await asyncio.wait_for(self.closed.wait(), 10)
        yield b""

    async def aclose(self):
        self.closed.set()


def test_async_stream_closed_from_another_task_stops_its_reader():
    async def main():
        body = _SlowAsyncBody()
        client, _ = async_client_for(Server(httpx.Response(200, stream=body)))
        stream = await client.completions.create(prompt="x", stream=True)
        assert (await anext(stream)).choices[0].text == "a"
        reader = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.05)  # the reader now waits inside the stream
        await stream.aclose()
        done, _ = await asyncio.wait([reader], timeout=10)
        assert done and stream.response.is_closed and body.closed.is_set()
        exc = reader.exception()
        assert isinstance(exc, (APIConnectionError, StopAsyncIteration)), exc

    asyncio.run(main())


def test_importable_without_torch_or_ray():
    code = ("import sys, serve_app.client; "
            "print(sorted(m for m in ('torch', 'ray', 'workers', 'router') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"
