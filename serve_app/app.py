"""The Ray Serve application: an OpenAI-compatible ingress in front of a pool of decoders.

``build_app`` (the ``import_path`` of the shipped Serve config) builds the graph from one
``ServeConfig``. The ingress validates, tokenises, asks the router for an arm and streams from a
``Decoder`` replica; the replica decodes with that arm step by step beside its other requests and
records the request's acceptance statistics in the store.
"""


import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

from serve_app.config import ServeConfig, load_config
from serve_app.metrics import DecoderMetrics, IngressMetrics
from serve_app.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
    generation_limit,
    new_id,
    now,
    usage,
)
from workers.errors import EngineDeadError
from workers.stats import acceptance_rate, add_lists, mean_acceptance_length

if TYPE_CHECKING:
    from router.store import StatsStore

log = logging.getLogger("s3d.serve")

# A decoder replica that died, cannot be reached or whose decode loop stopped (not an error in
# decoding itself, which would fail again): the request can be sent to another replica, and
# when none answers, the client is told to retry (503 with Retry-After).
REPLICA_FAILURES = (RayActorError, WorkerCrashedError, ReplicaUnavailableError,
                    DeploymentUnavailableError, EngineDeadError)


def retry_pause_s(attempt: int) -> float:
    """Pause before sending a request again (1, 2, 4 s): Serve needs a moment to notice a dead
    replica, and until then routes to it."""
    return 2.0 ** attempt


class _StoreUser:
    """A deployment with a statistics store, started on the replica's event loop in the
    background: no request waits on Redis for it, and a request cancelled meanwhile (a client
    gone while Redis is slow) cannot leave it unstarted. Closed on a graceful shutdown, so a
    replica scaled down writes what it still holds."""

    store: "StatsStore"
    _store_task: asyncio.Task | None = None

    def _start_store(self) -> None:
        """Start the store now if the constructor runs on an event loop (Serve runs it on the
        replica's), so its availability is known before the first request, not only after
        it; built without one (in a test), the first request starts it."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._ensure_store()

    def _ensure_store(self) -> None:
        if self._store_task is None:
            self._store_task = asyncio.get_running_loop().create_task(self.store.start())

    def __del__(self):
        """Serve calls ``__del__`` on a graceful shutdown and awaits the coroutine it returns.
        Not an ``async def``: Python's collector calls ``__del__`` again when it frees the
        replica, and that call would make a coroutine nobody awaits (a RuntimeWarning). The
        first call takes the store; any later one finds nothing to close and returns None."""
        task, self._store_task = self._store_task, None
        return None if task is None else self._close_store(task)

    async def _close_store(self, task: asyncio.Task) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.store.close()


@serve.deployment(name="Decoder")
class Decoder(_StoreUser):
    """One replica: the model, its step scheduler and the statistics it records."""

    def __init__(self, config: dict):
        import torch

        from router.store import make_store
        from workers.engine import Engine
        from workers.scheduler import StepScheduler

        self.config = ServeConfig.model_validate(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.engine = Engine.load(self.config.model, self.config.dtype, self.config.device,
                                  self.config.quantization, self.config.profile,
                                  self.config.packed_weights, self.config.pool,
                                  self.config.pool_tokens, self.config.pool_record)
        self.engine.prefill_chunk = self.config.prefill_chunk
        self.scheduler = StepScheduler(self.config.max_active_generations
                                       or self.config.max_ongoing_requests)
        self.metrics = DecoderMetrics()
        # A replica writes its requests' records and never routes: it pings, reads nothing.
        self.store = make_store(self.config.redis_url, prefix=self.config.stats_prefix,
                                on_availability_change=self.metrics.set_store_available,
                                reads=False)
        self.metrics.watch(self.store, self.scheduler)
        self._start_store()

    async def check_health(self) -> None:
        if not self.scheduler.healthy:
            raise RuntimeError(f"decoder loop stopped: {self.scheduler.error!r}")

    async def queue_length(self) -> int:
        """Generations on this replica: decoding, or waiting for a slot."""
        return self.scheduler.active + self.scheduler.waiting

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        """Stream ``{"index", "text", "token_ids", "finish_reason"}`` deltas of the request's
        ``n`` choices (decoded side by side, seeds ``seed + i``); each choice's last delta adds
        ``usage`` and ``spec_decode``."""
        self._ensure_store()
        n = payload.get("n", 1)
        if n == 1:
            async for item in self._choice(payload, 0):
                yield item
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            seed = payload.get("seed")
            try:
                async for item in self._choice({**payload, "seed": None if seed is None
                                                else seed + index}, index):
                    await queue.put(item)
            except Exception as exc:  # handed to the consumer, which re-raises it
                await queue.put(exc)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        remaining = n
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _choice(self, payload: dict, index: int) -> AsyncIterator[dict]:
        from router.store import StatsKey
        from workers.sampling import SamplingParams
        from workers.textstream import StopStrings, TextStream

        params = SamplingParams(payload["temperature"], payload["top_p"], payload["top_k"],
                                payload.get("seed"))
        gen = self.engine.generation(payload["prompt_ids"], payload["max_tokens"],
                                     payload["arm"], params, payload.get("depth"))
        text = TextStream(self.engine.tokenizer, prompt=gen.prompt)
        stops = StopStrings(payload.get("stop") or [])
        completion_tokens = None  # set when a stop string ends the text before the tokens do
        start = time.perf_counter()
        first_token_at = None
        finish_reason = None
        stats = gen.stats  # as of the last step read (the decode thread may run one more)
        # aclosing: a stop string ends the choice before the generation does; free its slot now.
        async with contextlib.aclosing(self.scheduler.stream(gen)) as steps:
            async for step in steps:
                stats = step.stats
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                delta = stops.push(text.push(step.tokens))
                if not stops.stopped and step.finished:
                    delta += stops.push(text.flush()) + stops.flush()
                    finish_reason = step.finish_reason
                if stops.stopped:
                    finish_reason = "stop"
                    # A step may commit tokens past the stop string: they are not output.
                    completion_tokens = text.tokens_through(stops.stop_end)
                if delta or finish_reason:
                    yield {"index": index, "text": delta, "token_ids": step.tokens,
                           "finish_reason": finish_reason}
                if finish_reason:
                    break
        elapsed = time.perf_counter() - start
        summary = stats.summary(gen.arm.name, gen.arm.draft_depth)
        try:  # figures are sinks: losing one never fails a served request
            self.metrics.observe_request(stats, gen.arm.name, elapsed,
                                         (first_token_at or start) - start, len(self.engine.pool))
            # The router compares arms by the request's own decoding time: its wall time
            # counts the other requests' steps between its own, which says how busy the
            # replica was, not how fast the arm decodes.
            # Tokens a step committed past a stop string are not output (usage counts them
            # out): the arm's goodput is the text's tokens over the time they took, as a plain
            # arm's, which stops on the token that completes the stop.
            recorded = stats if completion_tokens is None else dataclasses.replace(
                stats, num_output_tokens=min(stats.num_output_tokens, completion_tokens))
            self.store.record(StatsKey(self.config.stats_model, payload["bucket"],
                                       gen.arm.name), recorded, max(stats.decode_time_s, 1e-6))
        except Exception:
            log.exception("recording the statistics of a request failed")
        yield {"index": index, "text": "", "token_ids": [],
               "finish_reason": finish_reason or "stop",
               "usage": usage(len(gen.prompt), len(gen.output) if completion_tokens is None
                              else completion_tokens), "spec_decode": summary}


class ErrorResponse(JSONResponse):
    """An error's JSON with non-ASCII characters escaped. An error may quote the request (an
    unknown field's name), and a lone surrogate there (JSON's ``"\\ud800"``) cannot be written
    as the UTF-8 of Starlette's ``JSONResponse``: the 400 would become a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class SSEResponse(StreamingResponse):
    """An event stream that closes its events' generator however the response ends. Starlette
    leaves it open when a client's disconnect cancels the response while it awaits ``send``:
    the chain of generators down to the decoder's stream (which frees the replica's slot when
    closed) stayed suspended until garbage collection, and the replica kept decoding."""

    def __init__(self, events: AsyncIterator[str],
                 on_close: Callable[[], Awaitable[None]] | None = None):
        """``on_close`` is awaited once the response ends, however it ends: also when its events
        never started (the response failed or was cancelled while sending its headers), where
        the events' own ``finally`` never runs."""
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with contextlib.aclosing(self.body_iterator):
                await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                await self.on_close()


def _api_error_response(exc: APIError) -> JSONResponse:
    return ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class BodyTooLarge(HTTPException):
    """Raised while a body without a declared length (chunked) streams in past the limit."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyLimit:
    """ASGI middleware: counts the body's bytes as they arrive, so a chunked upload cannot get
    past the limit that a ``Content-Length`` header is checked against up front. The handler's
    body read raises ``BodyTooLarge``, answered as a 413 by the API's error handlers."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        return await self.app(scope, counted, send)


def create_api(config: ServeConfig) -> FastAPI:
    api = FastAPI(title="s3d-serve", version="0.1.0",
                  description="OpenAI-compatible API over lossless self-speculative decoding.")

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _api_error_response(exc)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("request failed")
        return ErrorResponse(error_body(f"internal error: {type(exc).__name__}", "server_error",
                                        code="internal_error"), status_code=500)

    async def _replica_failed(request: Request, exc: Exception):
        log.warning("no decoder replica could serve a request: %r", exc)
        return ErrorResponse(error_body("no decoder replica could serve the request; retry later",
                                        "server_error", code="replica_unavailable"),
                             status_code=503, headers={"Retry-After": str(config.retry_after_s)})

    for failure in REPLICA_FAILURES:
        api.add_exception_handler(failure, _replica_failed)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "body_too_large" if exc.status_code == 413 else None
        return ErrorResponse(error_body(str(exc.detail), kind, code=code),
                             status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [] if first.get("type") == "json_invalid" else [
            str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()[:5])
        return ErrorResponse(error_body(message or "invalid request", "invalid_request_error",
                                        loc[0] if loc else None, "invalid_value"), status_code=400)

    # Added before the middleware below, so it sits inside it (Starlette puts the last added
    # outermost): a receive wrapped by that one reports errors grouped, which the handler's body
    # read would turn into a 400.
    api.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    # Paths open without a key; every other path asks for one. Compared with the path the
    # routes match (under a Serve ``route_prefix`` such as ``/s3d`` the request's path keeps
    # the prefix, in ``root_path`` too): a check of the full path for ``/v1`` let
    # ``/s3d/v1/...`` through without a key.
    open_paths = {"/healthz"} | {url for url in (api.openapi_url, api.docs_url, api.redoc_url,
                                                 api.swagger_ui_oauth2_redirect_url) if url}

    @api.middleware("http")
    async def _limits_and_auth(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return _api_error_response(APIError(
                413, f"request body exceeds {config.max_body_bytes} bytes", code="body_too_large"))
        if config.api_keys and get_route_path(request.scope) not in open_paths:
            header = request.headers.get("authorization", "")
            key = header[7:] if header.lower().startswith("bearer ") else ""
            ok = False
            for candidate in config.api_keys:  # check every key: timing says nothing of which
                ok |= hmac.compare_digest(key.encode(), candidate.encode())
            if not ok:
                return _api_error_response(APIError(
                    401, "invalid or missing API key", type="authentication_error",
                    code="invalid_api_key"))
        return await call_next(request)

    return api


class IngressBase(_StoreUser):
    """Request handling; wrapped by ``@serve.ingress`` in ``build_app`` with the config's API."""

    def __init__(self, decoder: DeploymentHandle, config: dict):
        from transformers import AutoConfig, AutoTokenizer

        from router.policy import ArmRouter
        from router.store import make_store
        from workers.engine import resolve_profile
        from workers.model import (
            check_architecture,
            context_length,
            fingerprint,
            resolve_model_path,
        )

        self.config = ServeConfig.model_validate(config)
        self.decoder = decoder
        path = resolve_model_path(self.config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model_config = AutoConfig.from_pretrained(path)
        check_architecture(model_config)
        self.context = context_length(model_config)
        # Token ids a prompt may hold: in the tokenizer and in the embedding table.
        self.vocab_size = min(len(self.tokenizer),
                              int(getattr(model_config, "vocab_size", len(self.tokenizer))))
        self.profile = resolve_profile(self.config.profile, fingerprint(model_config),
                                       model_config.num_hidden_layers)
        default = self.config.default_arm or self.profile.default_arm
        self.profile.arm(default)
        self.metrics = IngressMetrics()
        self.store = make_store(self.config.redis_url, prefix=self.config.stats_prefix,
                                on_availability_change=self.metrics.set_store_available)
        if not self.store.shared and self.config.router == "adaptive":
            log.warning("no redis_url: the ingress's statistics store is its own, which no "
                        "decoder replica writes to, so the adaptive router keeps to the "
                        "profile's priors; set redis_url to route by measured goodput")
        self.router = ArmRouter.for_profile(self.profile, default, self.config.router,
                                            dtype=self.config.dtype,
                                            exploration=self.config.router_exploration)
        # Bayes-UCB routes are chosen when the store's refresh brings new figures (on the
        # event loop, between requests); a request classifies its prompt and looks one up.
        # With Redis, requests in flight count in the router's figures until theirs arrive
        # (without, no decoder writes to this store and none ever would).
        self.router.follow(self.store, self.config.stats_model)
        self._start_store()
        # One thread: a fast tokenizer used from two threads at once can fail ("Already
        # borrowed"), so requests take turns, off the event loop.
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, "tokenize")

    def _model_card(self) -> dict:
        return {"id": self.config.served_model_name, "object": "model", "created": 0,
                "owned_by": "s3d-serve", "arms": [a.name for a in self.profile.arms]}

    def _check_model(self, model: str | None) -> None:
        """404 for a model name this server does not serve (None: the served one)."""
        cfg = self.config
        if model is not None and model not in (cfg.served_model_name, cfg.model):
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{cfg.served_model_name!r}", param="model",
                           code="model_not_found")

    # --- request preparation ---------------------------------------------------------------

    def _prompt_ids(self, req: CompletionRequest | ChatCompletionRequest) -> tuple[list[int], str]:
        """The prompt's token ids, and the text its context bucket is read from."""
        from router.policy import conversation_text

        if isinstance(req, ChatCompletionRequest):
            # OpenAI's ``developer`` role is its ``system`` role under a newer name.
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in req.messages]
            try:
                out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=True)
            except Exception as exc:  # a template that rejects the conversation
                raise APIError(400, f"cannot apply the chat template: {exc}",
                               param="messages") from exc
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return list(ids), conversation_text(messages)
        if isinstance(req.prompt, list):
            bad = [t for t in req.prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"token ids out of range: {bad[:5]}", param="prompt")
            return list(req.prompt), self.tokenizer.decode(req.prompt)
        return list(self.tokenizer(req.prompt)["input_ids"]), req.prompt

    async def _prepare(self, req: SamplingFields, is_chat: bool) -> tuple[dict, int]:
        from router.policy import context_bucket

        cfg = self.config
        self._check_model(req.model)
        req.check_supported()
        if req.n > cfg.max_n:
            raise APIError(400, f"n must be at most {cfg.max_n}", param="n")
        stops = req.stop_list()
        if len(stops) > cfg.max_stop:
            raise APIError(400, f"at most {cfg.max_stop} stop strings", param="stop")
        if any(len(s) > cfg.max_stop_length for s in stops):
            raise APIError(400, f"stop strings must be at most {cfg.max_stop_length} characters",
                           param="stop")
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"{req.max_tokens_param()} must be at most "
                                f"{cfg.max_tokens_limit}", param=req.max_tokens_param())
        # Off the event loop: a long prompt's template and tokenisation would stall every
        # stream this ingress replica is sending meanwhile.
        ids, text = await asyncio.get_running_loop().run_in_executor(
            self._tokenize, self._prompt_ids, req)
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages" if is_chat else "prompt")
        max_tokens = generation_limit(req, is_chat, len(ids), self.context,
                                      cfg.default_max_tokens)
        decided = time.perf_counter()
        bucket = context_bucket(text, is_chat, req.temperature, len(ids))
        # A seeded sampled request must reproduce: its arm may not depend on the router's
        # exploration (greedy output is the same on every arm, so greedy requests are routed).
        reproducible = req.seed is not None and req.temperature > 0
        pinned = req.arm if req.arm is not None or not reproducible else self.router.default_arm
        try:
            route = self.router.route(bucket, pinned, sent=req.n)
        except KeyError:
            names = ", ".join(a.name for a in self.profile.arms)
            raise APIError(400, f"unknown arm {req.arm!r}; arms: {names}", param="arm") from None
        self.metrics.observe_decision(time.perf_counter() - decided)
        # Pinned: by the request, or to the default arm for a seeded sampled one.
        self.metrics.observe_arm(route.arm, pinned=pinned is not None)
        payload = {"prompt_ids": ids, "max_tokens": max_tokens, "arm": route.arm,
                   "depth": route.depth, "n": req.n,
                   "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                   "seed": req.seed, "stop": stops, "bucket": bucket}
        return payload, len(ids)

    # --- decoding -------------------------------------------------------------------------

    async def _stream(self, payload: dict, retries: int) -> AsyncIterator[dict]:
        """The decoder's items for ``payload``; sent again (up to ``retries`` times) if its
        replica dies before the first item."""
        for attempt in range(retries + 1):
            gen = None
            started = False
            try:
                gen = self.decoder.options(stream=True).generate.remote(payload)
                async for item in gen:
                    started = True
                    yield item
                return
            except BackPressureError as exc:
                raise APIError(503, "the server is at capacity; retry later",
                               type="server_error", code="overloaded",
                               headers={"Retry-After": str(self.config.retry_after_s)}) from exc
            except REPLICA_FAILURES as exc:
                if started or attempt == retries:
                    raise
                log.warning("a decoder replica failed before answering (%r); sending the "
                            "request again", exc)
            finally:
                if gen is not None:
                    with contextlib.suppress(Exception):  # cancel() re-raises a routing failure
                        gen.cancel()
            await asyncio.sleep(retry_pause_s(attempt))

    async def _collect(self, payload: dict, n: int) -> tuple[list[str], list[dict]]:
        """A non-streamed request's texts and final items. Nothing has reached the client, so
        a replica failure at any point sends the whole request again."""
        retries = self.config.replica_retries
        for attempt in range(retries + 1):
            texts = [""] * n
            finals: list[dict] = [{} for _ in range(n)]
            try:
                async for item in self._stream(payload, retries=0):
                    texts[item["index"]] += item["text"]
                    if "spec_decode" in item:
                        finals[item["index"]] = item
                return texts, finals
            except REPLICA_FAILURES as exc:
                if attempt == retries:
                    raise
                log.warning("a decoder replica failed mid-request (%r); sending the request "
                            "again", exc)
            await asyncio.sleep(retry_pause_s(attempt))
        raise RuntimeError("unreachable: the last attempt returns or raises")

    def _finished(self, payload: dict, recorded: int) -> None:
        """The request ended with ``recorded`` of its choices' final items (each sent after its
        statistics were recorded), the others without: the router counts the first as pending
        until its next figures, the others no more."""
        self.router.finished(payload["bucket"], payload["arm"], recorded,
                             payload["n"] - recorded)

    def _stream_end(self, payload: dict, items: AsyncGenerator[dict, None]
                    ) -> tuple[dict[int, dict], Callable[[], Awaitable[None]]]:
        """A streamed request's final items by choice (``_sse`` fills it) and what ends the
        request once, however its response ends: the router hears how many choices finished,
        and the decoder's stream is closed."""
        finals: dict[int, dict] = {}
        ended = False

        async def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._finished(payload, len(finals))
            await items.aclose()

        return finals, end

    async def complete(self, req: SamplingFields, is_chat: bool):
        self._ensure_store()
        started = time.perf_counter()
        payload, prompt_tokens = await self._prepare(req, is_chat)
        rid = new_id("chatcmpl" if is_chat else "cmpl")
        obj = "chat.completion" if is_chat else "text_completion"
        if req.stream:
            items = self._stream(payload, retries=self.config.replica_retries)
            # Wait for the first delta before answering 200, so back-pressure is a real 503.
            finals, end = self._stream_end(payload, items)
            try:
                first = await anext(items, None)
            except BaseException:
                await end()
                raise
            return SSEResponse(self._sse(req, is_chat, first, items, prompt_tokens, rid, started,
                                         finals, end), on_close=end)
        try:
            texts, finals = await self._collect(payload, req.n)
        except BaseException:
            self._finished(payload, 0)
            raise
        self._finished(payload, sum(1 for final in finals if final))
        choices = []
        for i, (text, final) in enumerate(zip(texts, finals)):
            if is_chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": final.get("finish_reason"), "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "logprobs": None,
                                "finish_reason": final.get("finish_reason")})
        completion_tokens = sum(f["usage"]["completion_tokens"] for f in finals)
        self.metrics.observe_latency(time.perf_counter() - started)
        return {"id": rid, "object": obj, "created": now(), "model": self.config.served_model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
                "spec_decode": merge_spec_decode([f["spec_decode"] for f in finals])}

    async def _sse(self, req: SamplingFields, is_chat: bool, first: dict | None,
                   items: AsyncGenerator[dict, None], prompt_tokens: int, rid: str,
                   started: float, finals: dict[int, dict],
                   end: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
        """The events of a streamed request: ``first``, then the rest of the decoder's
        ``items``; ``end`` (which closes them) is awaited when this stream is closed (by
        ``SSEResponse``), at whichever ``yield`` it stands. The choices' final items go to
        ``finals``."""
        obj = "chat.completion.chunk" if is_chat else "text_completion"
        created = now()
        model = self.config.served_model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # With usage asked for, every chunk says ``"usage": null`` but the last, as OpenAI's do.
        no_usage = {"usage": None} if include_usage else {}

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": choices, **no_usage, **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if is_chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None} for i in range(req.n)])
            async for item in with_first(first, items):
                index = item["index"]
                final = "spec_decode" in item
                if final:
                    finals[index] = item
                if not item["text"] and not final:
                    continue
                if is_chat:
                    choice = {"index": index, "delta": {"content": item["text"]} if item["text"]
                              else {}, "finish_reason": item["finish_reason"] if final else None}
                else:
                    choice = {"index": index, "text": item["text"], "logprobs": None,
                              "finish_reason": item["finish_reason"] if final else None}
                extra = {"spec_decode": item["spec_decode"]} if final else {}
                yield chunk([choice], **extra)
            if include_usage:
                completion_tokens = sum(f["usage"]["completion_tokens"] for f in finals.values())
                yield chunk([], usage=usage(prompt_tokens, completion_tokens),
                            spec_decode=merge_spec_decode([f["spec_decode"]
                                                           for f in finals.values()]))
            self.metrics.observe_latency(time.perf_counter() - started)
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:  # a replica died mid-stream: end with an error event
            log.warning("stream %s failed: %r", rid, exc)
            yield "data: " + json.dumps(error_body(
                f"the decoder failed mid-stream: {type(exc).__name__}", "server_error",
                code="decoder_failed")) + "\n\n"
        finally:  # closed at a yield (a client gone): close the decoder's stream now
            await end()
        yield "data: [DONE]\n\n"


async def with_first(first: dict | None, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def merge_spec_decode(items: list[dict]) -> dict:
    """One ``spec_decode`` object for a request with several choices."""
    if len(items) == 1:
        return items[0]
    steps = sum(i["num_spec_steps"] for i in items)
    drafted = sum(i["num_draft_tokens"] for i in items)
    accepted = sum(i["num_accepted_tokens"] for i in items)
    per_pos = functools.reduce(add_lists, (i.get("num_accepted_tokens_per_pos", [])
                                           for i in items), [])
    return {"arm": items[0]["arm"], "depth": items[0].get("depth"),
            "mean_acceptance_length": round(mean_acceptance_length(accepted, steps), 4),
            "draft_acceptance_rate": round(acceptance_rate(accepted, drafted), 4),
            "num_spec_steps": steps, "num_drafts": sum(i["num_drafts"] for i in items),
            "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": per_pos,
            "num_forward_passes": sum(i.get("num_forward_passes", 0) for i in items)}


def make_ingress(config: ServeConfig):
    api = create_api(config)

    @serve.deployment(name="Ingress")
    @serve.ingress(api)
    class Ingress(IngressBase):
        @api.post("/v1/completions")
        async def completions(self, req: CompletionRequest):
            return await self.complete(req, is_chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, req: ChatCompletionRequest):
            return await self.complete(req, is_chat=True)

        @api.get("/v1/models")
        async def models(self):
            return {"object": "list", "data": [self._model_card()]}

        @api.get("/v1/models/{model:path}")
        async def model(self, model: str):
            self._check_model(model)
            return self._model_card()

        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "model": self.config.served_model_name,
                    "stats_store_available": self.store.available}

    return Ingress


def build_app(args: dict | None = None):
    """Serve application builder: ``args`` may hold ``config`` (a YAML path) and field overrides."""
    args = dict(args or {})
    config = load_config(args.pop("config", None), overrides=args)
    decoder_options = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.replica_num_cpus,
                              "num_gpus": config.replica_num_gpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
    }
    if config.min_replicas == config.max_replicas:
        decoder_options["num_replicas"] = config.max_replicas
    else:
        decoder_options["autoscaling_config"] = {
            "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests}
    decoder = Decoder.options(**decoder_options).bind(config.model_dump())
    ingress = make_ingress(config).options(
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        max_ongoing_requests=max(100, 4 * config.max_ongoing_requests * config.max_replicas))
    return ingress.bind(decoder, config.model_dump())
