"""The Serve application's HTTP layer and replica lifecycle, without a Ray cluster: the API of
``create_api`` through httpx's ASGI transport, the event stream and the statistics store."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import types
import warnings

import httpx
import pytest

from serve_app.app import (
    Decoder,
    IngressBase,
    SSEResponse,
    _api_error_response,
    _StoreUser,
    create_api,
)
from serve_app.config import ServeConfig
from serve_app.openai_api import APIError, CompletionRequest, SamplingFields
from tests.conftest import free_port

KEY = "unit-key"


def api_with_routes(**config):
    """``create_api`` with stand-ins for the ingress's routes: the same middleware, error
    handlers and request models, no model behind them."""
    api = create_api(ServeConfig(**config))

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest):
        req.check_supported()
        return {"ok": True}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return api


def call(api, method: str, path: str, root_path: str = "", **kwargs) -> httpx.Response:
    """One request as Ray's proxy hands it to the app: under a ``route_prefix`` the path keeps
    the prefix and ``root_path`` is the prefix."""
    async def main():
        transport = httpx.ASGITransport(api, root_path=root_path, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://s3d") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


@pytest.mark.parametrize("prefix", ["", "/s3d"])
def test_api_key_is_required_under_a_serve_route_prefix(prefix):
    """Auth was checked with ``request.url.path.startswith("/v1")``: under the route prefix
    ``/s3d`` the path is ``/s3d/v1/...``, and every /v1 route answered without a key."""
    api = api_with_routes(api_keys=[KEY])
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("GET", "/v1/nothing-here")):
        resp = call(api, method, prefix + path, prefix, json={"prompt": "hi"})
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"
    ok = call(api, "GET", prefix + "/v1/models", prefix,
              headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200, ok.text
    for path in ("/healthz", "/openapi.json"):  # open, as they were
        assert call(api, "GET", prefix + path, prefix).status_code == 200, path


def post_json(api, text: str) -> httpx.Response:
    """POST ``text`` as the JSON body (so a ``\\ud800`` escape arrives as a lone surrogate)."""
    return call(api, "POST", "/v1/completions", content=text.encode(),
                headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("body", [r'{"prompt": "abc\ud800def"}', r'{"prompt": ["\udfff"]}'])
def test_a_lone_surrogate_in_the_prompt_is_a_400_on_the_prompt(body):
    """The tokenizer raised TypeError on a lone surrogate in a completion prompt (JSON
    ``"abc\\ud800def"``): a 500 instead of a 400 naming the prompt."""
    resp = post_json(api_with_routes(), body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "prompt" and "lone surrogate" in error["message"]


def test_an_error_quoting_a_lone_surrogate_is_sent_as_a_400():
    """An unknown field's error quotes its name; with a lone surrogate in it (a request as
    pydantic leaves it when it keeps such a key among the extras), Starlette's JSONResponse
    could not encode the error as UTF-8: a 500 instead of the 400. Every error body is now
    ASCII, the name escaped as it was sent."""
    req = CompletionRequest.model_construct(prompt="hi", **{"x\ud800": 1})
    with pytest.raises(APIError) as err:
        req.check_supported()
    resp = _api_error_response(err.value)
    assert resp.status_code == 400 and resp.body.isascii()
    error = json.loads(resp.body)["error"]
    assert error["param"] == "x\ud800" and error["code"] == "unknown_parameter"
    # Over HTTP (the installed pydantic refuses such a key itself): a 400 in the OpenAI shape.
    resp = post_json(api_with_routes(), r'{"prompt": "hi", "x\ud800": 1}')
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param",
                                                                      "code"}


BUCKET = "chat.t0.ps"


def routed_ingress() -> IngressBase:
    """An ingress's request handling with a real router following an in-process store on a
    clock of the test's, counting requests in flight as with Redis; no model, decoder or store
    behind it."""
    from router.policy import ArmRouter
    from router.simulate import SimClock
    from router.store import InProcessStatsStore

    ingress = IngressBase.__new__(IngressBase)
    ingress.config = ServeConfig()
    ingress.router = ArmRouter(["none", "ngram_tree"], "none")
    ingress.router.follow(InProcessStatsStore(clock=SimClock()), "m", count_pending=True)
    ingress.metrics = types.SimpleNamespace(observe_latency=lambda seconds: None)
    ingress._ensure_store = lambda: None
    return ingress


def routed_payload(ingress: IngressBase, n: int) -> dict:
    """What ``_prepare`` hands on for a request of ``n`` choices, routed as it routes one."""
    route = ingress.router.route(BUCKET, sent=n)
    return {"bucket": BUCKET, "arm": route.arm, "n": n}


def final_item(index: int) -> dict:
    return {"index": index, "text": "", "token_ids": [], "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "spec_decode": {"arm": "none", "depth": None, "num_spec_steps": 0, "num_drafts": 0,
                            "num_draft_tokens": 0, "num_accepted_tokens": 0}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("outcome", ["served", "refused", "failed"])
def test_the_router_counts_a_request_pending_until_its_figures_can_arrive(stream, outcome):
    """A request counts in its bucket's figures from its routing (so the next ones are not all
    sent after it to one arm) until its records arrive, and once it ended with its choices'
    final items for the store's feedback lag at most; one refused (503) or failed before
    them never records, and stops counting when it ends."""
    ingress = routed_ingress()
    router = ingress.router
    req = SamplingFields(stream=stream, n=2)

    async def prepare(req, is_chat):
        return routed_payload(ingress, req.n), 1

    async def decoder_items(payload, retries):
        if outcome == "refused":
            raise APIError(503, "the server is at capacity; retry later", type="server_error")
        yield {"index": 0, "text": "x", "token_ids": [1], "finish_reason": None}
        if outcome == "failed":
            raise RuntimeError("a replica died")
        yield final_item(0)
        yield final_item(1)

    async def collect(payload, n):  # as ``_collect``: a final item, or {}, per choice
        finals = [{}] * n
        async for item in decoder_items(payload, 0):
            if "spec_decode" in item:
                finals[item["index"]] = item
        return ["x", ""], finals

    ingress._prepare, ingress._stream, ingress._collect = prepare, decoder_items, collect

    async def main():
        try:
            response = await ingress.complete(req, is_chat=True)
        except (APIError, RuntimeError):
            return
        assert router.pending(BUCKET) == {"none": 2}  # answered or still decoding
        if stream:
            async for _ in response.body_iterator:
                pass

    asyncio.run(main())
    assert router.pending(BUCKET) == ({"none": 2} if outcome == "served" else {})
    router.clock.now += router.landing_s + 0.1  # no record came in the store's feedback lag
    assert router.pending(BUCKET) == {}


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
@pytest.mark.parametrize("cut_at", ["http.response.start", "http.response.body"],
                         ids=["headers", "body"])
@pytest.mark.parametrize("is_chat", [False, True], ids=["completion", "chat"])
def test_a_disconnect_while_sending_closes_the_decoder_stream_at_once(is_chat, cut_at, spec):
    """A client's disconnect cancelling the response while it awaited ``send`` left the event
    generators suspended at ``yield``: the decoder's stream (and the replica's slot) was only
    released at garbage collection. A chat stream is cut while its first event (the role,
    before any decoded item) is being sent. Cut while sending the headers, the events'
    generator never started and its ``finally`` never ran: the request also stayed pending in
    the router for 10 minutes."""
    closed = asyncio.Event()
    ingress = routed_ingress()
    req = SamplingFields(stream=True)
    payload = routed_payload(ingress, req.n)

    async def decoder_items():
        try:
            while True:
                yield {"index": 0, "text": "x", "token_ids": [1], "finish_reason": None}
        finally:
            closed.set()

    async def main():
        items = decoder_items()
        finals, end = ingress._stream_end(payload, items)
        response = SSEResponse(ingress._sse(req, is_chat, await anext(items), items, 1,
                                            "cmpl-1", 0.0, finals, end), on_close=end)
        sending = asyncio.Event()

        async def send(message):
            if message["type"] == cut_at:
                sending.set()
                await asyncio.Event().wait()  # a client that stopped reading

        async def receive():
            await asyncio.Event().wait()

        scope = {"type": "http", "asgi": {"spec_version": spec}}
        task = asyncio.create_task(response(scope, receive, send))
        await sending.wait()
        task.cancel()  # what a disconnect does to the request's task
        with pytest.raises(asyncio.CancelledError):
            await task
        # ``response`` still holds the stream: only an explicit close releases the decoder's.
        assert closed.is_set(), "the decoder's stream is still open"

    asyncio.run(main())
    # The client left before the choice's final item: its record will never come.
    assert ingress.router.pending(BUCKET) == {}


class _Store:
    def __init__(self):
        self.started = self.closed = 0

    async def start(self):
        self.started += 1

    async def close(self):
        self.closed += 1


class _Replica(_StoreUser):
    def __init__(self, store):
        self.store = store
        self._start_store()


def test_a_second_destructor_call_is_harmless():
    """``async def __del__``: Serve awaited it on shutdown, then Python's collector called it
    again when freeing the replica, leaving a coroutine never awaited (a RuntimeWarning)."""
    store = _Store()

    async def main():
        replica = _Replica(store)
        await asyncio.sleep(0)
        result = replica.__del__()  # as Serve's call_destructor calls it
        if inspect.iscoroutine(result):
            await result
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del replica
            gc.collect()
        assert not [w for w in caught if "never awaited" in str(w.message)], caught

    asyncio.run(main())
    assert (store.started, store.closed) == (1, 1)


@pytest.mark.model
@pytest.mark.parametrize("deployment", ["Ingress", "Decoder"])
def test_a_replica_starts_its_store_before_any_request(deployment, monkeypatch):
    """The store started on the first request: before it, the ingress's /healthz said
    ``stats_store_available: false`` with Redis up, and the availability gauge, set to 1 at
    start, said Redis was up on an idle replica during an outage."""
    from workers.engine import Engine

    # The decoder's model plays no part in its store: a stand-in spares loading it.
    monkeypatch.setattr(Engine, "load", lambda *args: types.SimpleNamespace())
    config = {"redis_url": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there

    async def main():
        replica = (IngressBase(None, config) if deployment == "Ingress"
                   else Decoder.func_or_class(config))
        gauges = replica.metrics._gauges
        assert replica.metrics.store_available not in gauges  # unknown yet: nothing claimed
        for _ in range(100):  # no request: the store's own first refresh finds Redis down
            if replica.metrics.store_available in gauges:
                break
            await asyncio.sleep(0.05)
        assert gauges.get(replica.metrics.store_available) == 0
        assert replica.store.available is False
        await replica.__del__()

    asyncio.run(main())


@pytest.mark.model
def test_a_step_past_a_stop_string_records_only_the_text_s_tokens():
    """An n-gram step that commits ", 16," at once meets the stop string "16" at its fourth
    token: the comma after it is not output (usage), and the replica's record for the router
    counted it (the arm's goodput read higher than the text it gave)."""
    async def main():
        decoder = Decoder.func_or_class({})  # the bundled model; no Redis: its own store
        ids = decoder.engine.tokenizer(", ".join(str(i) for i in range(1, 15)) + ",")
        payload = {"prompt_ids": ids["input_ids"], "max_tokens": 24, "arm": "ngram_tree",
                   "depth": None, "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                   "seed": None, "stop": ["16"], "bucket": "prose.t0.ps"}
        items = [item async for item in decoder.generate(payload)]
        records = decoder.store.snapshot(decoder.config.stats_model, "prose.t0.ps")
        await decoder.__del__()
        return items, records

    items, records = asyncio.run(main())
    assert "".join(item["text"] for item in items) == " 15, "
    committed = sum(len(item["token_ids"]) for item in items)
    output = items[-1]["usage"]["completion_tokens"]
    assert committed > output  # the step went past the stop
    (record,) = records.values()
    assert record.num_output_tokens == pytest.approx(output, abs=0.01)  # decayed a moment


@pytest.mark.parametrize("fields,slots", [({"max_ongoing_requests": 3}, 3),
                                          ({"max_ongoing_requests": 3,
                                            "max_active_generations": 5}, 5)])
def test_a_decoder_s_slots_bound_its_generations_not_its_requests(fields, slots, monkeypatch):
    """A request's ``n`` choices each take a decoding slot: a replica held up to ``max_n`` x
    ``max_ongoing_requests`` generations, each with a KV cache."""
    from workers.engine import Engine

    monkeypatch.setattr(Engine, "load", lambda *args: types.SimpleNamespace())

    async def main():
        replica = Decoder.func_or_class({"redis_url": None, **fields})
        try:
            assert replica.scheduler.max_active == slots
            assert await replica.queue_length() == 0
        finally:
            await replica.__del__()

    asyncio.run(main())
