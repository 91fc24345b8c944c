"""Unit tests of the load-test engine against a tiny imitation of the API served on 127.0.0.1.

The imitation answers 503 (with Retry-After) to every 5th request it receives; some prompts
change its behaviour: FAIL-MID-STREAM (error event in the stream, 500 when not streamed),
NO-DONE (stream without [DONE]), BAD-JSON (undecodable event), NO-USAGE (stream without the
usage chunk), SLOW (a stream that takes far longer than any test waits), and ONE-TOKEN and LONG
(other spec_decode figures: no verify step, and more steps than SPEC's).
"""

import asyncio
import json
import threading
import time
from collections import Counter

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve_app.loadtest import (
    DEFAULT_PROMPTS,
    LoadConfig,
    LoadReport,
    check_loopback,
    report_table,
    request_kind,
    run_load,
    run_load_sync,
)
from tests.conftest import free_port

API_KEY = "secret-key-42"
CHUNKS = ["Hello", ",", " world"]
COMPLETION_TOKENS = 7  # deliberately not len(CHUNKS): usage wins over counting events
SPEC = {"arm": "skip12-17", "mean_acceptance_length": 2.5, "draft_acceptance_rate": 0.75,
        "num_spec_steps": 4, "num_drafts": 4, "num_draft_tokens": 8, "num_accepted_tokens": 6}
SPECS = {"ONE-TOKEN": {**SPEC, "mean_acceptance_length": 0.0, "num_spec_steps": 0,
                       "num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0},
         "LONG": {**SPEC, "mean_acceptance_length": 3.0, "num_spec_steps": 12, "num_drafts": 12,
                  "num_draft_tokens": 36, "num_accepted_tokens": 24}}
USAGE = {"prompt_tokens": 3, "completion_tokens": COMPLETION_TOKENS,
         "total_tokens": 3 + COMPLETION_TOKENS}


class FakeServer:
    """State of the imitation: its URL and what it received (the count drives the 503s)."""

    def __init__(self):
        self.base_url = ""
        self.bodies: list[dict] = []
        self.auth: list[str] = []

    def reset(self) -> None:
        self.bodies.clear()
        self.auth.clear()


def sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "param": None,
                      "code": "overloaded" if status == 503 else None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_fake_api(state: FakeServer) -> FastAPI:
    api = FastAPI()

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        state.auth.append(request.headers.get("authorization", ""))
        if len(state.bodies) % 5 == 0:
            return error(503, "the server is at capacity; retry later", {"Retry-After": "1"})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        spec = SPECS.get(prompt, SPEC)
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            if prompt == "FAIL-MID-STREAM":
                return error(500, "the decoder failed")
            text = "".join(CHUNKS)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
            return {"id": "cmpl-1", "object": obj, "created": 0, "model": "tiny",
                    "choices": [choice], "usage": USAGE, "spec_decode": spec}

        def chunk(text: str | None, **extra) -> str:
            if text is None:
                choices = []
            elif chat:
                choices = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
            else:
                choices = [{"index": 0, "text": text, "finish_reason": None}]
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            return sse({"id": "cmpl-1", "object": chunk_obj, "created": 0,
                        "model": "tiny", "choices": choices, **extra})

        async def events():
            if chat:
                yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
            for i, text in enumerate(CHUNKS):
                await asyncio.sleep(30 if prompt == "SLOW" else 0.01)
                yield chunk(text)
                if prompt == "FAIL-MID-STREAM" and i == 0:
                    yield sse({"error": {"message": "the decoder failed mid-stream",
                                         "type": "server_error", "param": None,
                                         "code": "decoder_failed"}})
                    yield "data: [DONE]\n\n"
                    return
                if prompt == "BAD-JSON":
                    yield "data: {not json\n\n"
            yield chunk("", spec_decode=spec)
            if body.get("stream_options", {}).get("include_usage") and prompt != "NO-USAGE":
                yield chunk(None, usage=USAGE, spec_decode=spec)
            if prompt != "NO-DONE":
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return api


@pytest.fixture(scope="module")
def fake_server():
    state = FakeServer()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_fake_api(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    state.base_url = f"http://127.0.0.1:{port}"
    yield state
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def server(fake_server):
    fake_server.reset()
    return fake_server


def load(server: FakeServer, **fields) -> LoadReport:
    return run_load_sync(LoadConfig(base_url=server.base_url, **fields))


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.1.2.3:1/v1/",
                                 "http://localhost:8000", "https://LOCALHOST", "http://[::1]:80",
                                 "http://[::ffff:127.0.0.1]:80"])
def test_loopback_urls_are_accepted(url):
    assert LoadConfig(base_url=url, requests=1).base_url == check_loopback(url)
    assert not check_loopback(url).endswith(("/", "/v1"))


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com",
                                 "http://127.0.0.1@example.com/", "http://localhost.example.com",
                                 "http://[::2]:80", "http://0.0.0.0:8000", "ftp://127.0.0.1",
                                 "http://127.0.0.1:port"])
def test_non_loopback_urls_are_refused_before_sending(url, monkeypatch):
    with pytest.raises(ValueError, match="loopback|http|valid URL"):
        LoadConfig(base_url=url, requests=1)

    def no_client(*args, **kwargs):
        raise AssertionError("an HTTP client was created for a refused URL")

    monkeypatch.setattr(httpx, "AsyncClient", no_client)
    unchecked = LoadConfig.model_construct(**{**LoadConfig(requests=1).model_dump(),
                                              "base_url": url})
    with pytest.raises(ValueError, match="loopback|http|valid URL"):
        asyncio.run(run_load(unchecked))


def test_config_is_always_bounded():
    with pytest.raises(ValueError, match="duration_s, requests or both"):
        LoadConfig()
    with pytest.raises(ValueError, match="exceeds max_duration_s"):
        LoadConfig(duration_s=700, max_duration_s=600)
    # Without a cap, the requests in flight at the deadline may run to their timeout.
    assert LoadConfig(duration_s=700).max_duration_s == 760
    assert LoadConfig(duration_s=600, timeout_s=30).max_duration_s == 630
    assert LoadConfig(duration_s=10).max_duration_s == 600
    for bad in ({"clients": 0}, {"clients": 257}, {"duration_s": float("inf")},
                {"max_duration_s": float("inf")}, {"stream_fraction": 1.5}, {"prompts": []}):
        with pytest.raises(ValueError):
            LoadConfig(requests=1, **bad)
    assert LoadConfig(requests=1).max_duration_s == 600


def test_request_kinds_are_spread_evenly_and_deterministically():
    kinds = [request_kind(i, 0.3, 0.5) for i in range(100)]
    assert kinds == [request_kind(i, 0.3, 0.5) for i in range(100)]
    assert sum(stream for stream, _ in kinds) == 30
    assert sum(chat for _, chat in kinds) == 50
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        (True, True): 15, (True, False): 15, (False, True): 35, (False, False): 35}
    assert not any(any(request_kind(i, 0.0, 0.0)) for i in range(20))
    assert all(all(request_kind(i, 1.0, 1.0)) for i in range(20))


def test_every_prompt_goes_with_every_kind_of_request(server):
    """Each kind takes the prompts in turn on its own: with the command's defaults (half the
    requests streamed, half chat, six prompts), streamed requests once only sent the odd ones."""
    load(server, clients=2, requests=4 * len(DEFAULT_PROMPTS), stream_fraction=0.5,
         chat_fraction=0.5)
    sent = Counter((b["stream"], "messages" in b,
                    b["messages"][-1]["content"] if "messages" in b else b["prompt"])
                   for b in server.bodies)
    assert sent == Counter({(stream, chat, prompt): 1 for stream in (True, False)
                            for chat in (True, False) for prompt in DEFAULT_PROMPTS})


# --- runs against the imitation ----------------------------------------------------------------


def test_mixed_run_stops_at_the_request_budget(server):
    report = load(server, clients=4, requests=20, stream_fraction=0.5, chat_fraction=0.5,
                  arm="skip12-17", model="tiny", max_tokens=8, api_key=API_KEY)
    assert len(server.bodies) == 20
    assert report.stopped_by == "requests"
    assert (report.requests_sent, report.requests_ok, report.requests_failed) == (20, 16, 4)
    assert report.requests_cancelled == 0
    assert report.errors == {"http_503": 4}
    assert report.output_tokens == 16 * COMPLETION_TOKENS
    assert report.tokens_per_s > 0 and report.requests_per_s > 0
    assert report.latency_s.samples == 16
    assert 0 < report.latency_s.p50 <= report.latency_s.p95 <= report.latency_s.p99
    assert report.latency_s.p99 <= report.latency_s.max
    assert 0 < report.ttft_s.samples < 16
    assert report.itl_s.samples == 2 * report.ttft_s.samples
    assert report.ttft_s.p50 > 0 and report.itl_s.p50 > 0
    assert report.spec_decode.responses == 16
    assert report.spec_decode.mean_acceptance_length == 2.5
    assert report.spec_decode.arms == {"skip12-17": 16}

    streamed = [b for b in server.bodies if b["stream"]]
    assert len(streamed) == 10 and sum("messages" in b for b in server.bodies) == 10
    assert all(b["stream_options"] == {"include_usage": True} for b in streamed)
    assert all(b["arm"] == "skip12-17" and b["model"] == "tiny" and b["max_tokens"] == 8
               for b in server.bodies)
    assert set(server.auth) == {f"Bearer {API_KEY}"}
    assert API_KEY not in report.model_dump_json()


def test_unstreamed_run_has_no_ttft_or_itl(server):
    report = load(server, clients=2, requests=4)
    assert report.requests_ok == 4 and report.errors == {}
    assert report.latency_s.samples == 4 and report.latency_s.mean > 0
    assert report.ttft_s.samples == 0 and report.ttft_s.p50 is None
    assert report.itl_s.samples == 0 and report.itl_s.p99 is None
    assert report.output_tokens == 4 * COMPLETION_TOKENS
    assert "stream_options" not in server.bodies[0]


def test_streamed_failures_are_counted_by_kind(server):
    report = load(server, clients=2, requests=4, stream_fraction=1.0,
                  prompts=["FAIL-MID-STREAM", "NO-DONE", "BAD-JSON", "hello"])
    assert report.requests_ok == 1 and report.requests_failed == 3
    assert report.errors == {"protocol": 2, "stream_error": 1}
    assert report.ttft_s.samples == 1 and report.latency_s.samples == 1
    assert report.output_tokens == COMPLETION_TOKENS


def test_unstreamed_server_error_is_counted_by_status(server):
    report = load(server, requests=2, prompts=["FAIL-MID-STREAM"])
    assert report.errors == {"http_500": 2}
    assert report.latency_s.samples == 0 and report.latency_s.mean is None


def test_stream_tokens_are_counted_from_events_without_usage(server):
    report = load(server, clients=1, requests=2, stream_fraction=1.0, chat_fraction=0.5,
                  prompts=["NO-USAGE"])
    assert report.requests_ok == 2
    assert report.output_tokens == 2 * len(CHUNKS)
    assert report.spec_decode.responses == 2


def test_acceptance_length_pools_the_responses_steps(server):
    """Accepted tokens and steps summed over the responses, as the server merges a request's
    choices: (6 + 0 + 24 accepted + 16 steps) / 16 steps, not the mean of 2.5, 0.0 and 3.0 (a
    one-token answer ran no verify step)."""
    report = load(server, clients=1, requests=3, prompts=["hello", "ONE-TOKEN", "LONG"])
    assert report.spec_decode.responses == 3
    assert report.spec_decode.mean_acceptance_length == (30 + 16) / 16
    none = load(server, clients=1, requests=1, prompts=["ONE-TOKEN"])
    assert none.spec_decode.responses == 1 and none.spec_decode.mean_acceptance_length is None


def test_duration_run_stops_by_itself(server):
    report = load(server, clients=2, duration_s=0.5, stream_fraction=0.5)
    assert report.stopped_by == "duration"
    assert 0.5 <= report.duration_s < 5
    assert report.requests_ok > 0
    assert report.requests_sent == report.requests_ok + report.requests_failed


def test_slow_requests_time_out(server):
    report = load(server, clients=2, requests=2, stream_fraction=1.0, prompts=["SLOW"],
                  timeout_s=0.3)
    assert report.errors == {"timeout": 2}
    assert report.duration_s < 5


def test_hard_cap_cancels_running_requests(server):
    report = load(server, clients=3, requests=1000, max_duration_s=0.5, timeout_s=30,
                  stream_fraction=1.0, prompts=["SLOW"])
    assert report.stopped_by == "max_duration"
    assert report.requests_cancelled == 3 and report.requests_ok == 0
    assert report.duration_s < 5


def test_refused_connections_are_counted():
    report = run_load_sync(LoadConfig(base_url=f"http://127.0.0.1:{free_port()}", requests=3,
                                      clients=2, stream_fraction=0.5, timeout_s=5))
    assert report.errors == {"connection": 3}
    assert report.requests_ok == 0 and report.output_tokens == 0


def test_report_table_shows_the_figures(server):
    report = load(server, clients=3, requests=10, stream_fraction=0.5)
    table = report_table(report)
    assert f"| requests ok | {report.requests_ok} |" in table
    assert f"| requests failed | {report.requests_failed} |" in table
    assert "http_503: 2" in table
    assert f"| output tokens | {report.output_tokens} |" in table
    assert "skip12-17: 8" in table and "2.500" in table
    assert f"{report.latency_s.p50 * 1000:.1f}" in table
    assert f"{report.ttft_s.p95 * 1000:.1f}" in table
    assert "stopped by requests" in table
    assert json.loads(report.model_dump_json(indent=2))["requests_ok"] == report.requests_ok
