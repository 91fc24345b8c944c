"""The served application through real clients: the official openai package, httpx, the SDK."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_app.client import AsyncS3DClient, S3DClient

pytestmark = pytest.mark.serve
MODEL = "smollm2-135m-instruct"
# The model under which the suite's replicas record statistics: the name with its numerics.
STATS_MODEL = f"{MODEL}@float32"

SPEC_FIELDS = {"arm", "mean_acceptance_length", "draft_acceptance_rate", "num_spec_steps",
               "num_draft_tokens", "num_accepted_tokens"}


def oai(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.api_key,
                         max_retries=0)


def test_health_reports_the_statistics_store_before_any_request(served):
    """The replicas started their store on their first request: until then /healthz said
    ``stats_store_available: false`` with Redis up. First in the file, so it runs before any
    request in a run of this file (alone, it always does)."""
    deadline = time.time() + 30
    while not httpx.get(served.base_url + "/healthz", timeout=10).json()["stats_store_available"]:
        assert time.time() < deadline, "the store never became available without a request"
        time.sleep(0.5)


def test_openai_completion_with_usage_and_spec_decode(served):
    out = oai(served).completions.create(model=MODEL, prompt="def fibonacci(n):\n", max_tokens=12,
                                         temperature=0)
    assert out.choices[0].text
    assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    spec = out.model_extra["spec_decode"]
    assert SPEC_FIELDS <= set(spec)
    assert spec["num_spec_steps"] >= 1


def test_openai_chat_stream_with_usage(served):
    stream = oai(served).chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True})
    text, finish, usage, spec = "", None, None, None
    for chunk in stream:
        # Asked for usage, every chunk carries the field (null until the last), as OpenAI's do.
        assert "usage" in chunk.model_fields_set, chunk
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
            spec = chunk.model_extra.get("spec_decode")
    assert text and finish in ("stop", "length")
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 5
    assert SPEC_FIELDS <= set(spec)


def test_a_prompt_of_several_prefill_chunks_streams_and_counts(served):
    # 1,300 prompt tokens take three prefill steps on the decoder (512 per step), which hand
    # nothing to the stream; the first chunk that reaches the client carries a token.
    prompt = [100 + i % 900 for i in range(1300)]
    stream = oai(served).completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == 1300 and chunks[-1].usage.completion_tokens == 3


def test_every_profile_arm_serves_identical_greedy_text(served):
    client = oai(served)
    arms = client.models.list().data[0].model_extra["arms"]
    assert "none" in arms and len(arms) >= 2
    prompt = "import os\n\ndef list_python_files(folder):\n    "
    texts = {}
    for arm in arms:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                        temperature=0, extra_body={"arm": arm})
        assert out.model_extra["spec_decode"]["arm"] == arm
        depth = out.model_extra["spec_decode"]["depth"]
        assert (depth is None) == (arm == "none") and (depth is None or depth >= 1)
        texts[arm] = out.choices[0].text
    assert len(set(texts.values())) == 1, texts


def test_models_and_health(served):
    models = oai(served).models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]
    health = httpx.get(served.base_url + "/healthz").json()
    assert health["status"] == "ok"


def test_n_seed_and_stop(served):
    client = oai(served)
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                    temperature=1.0, seed=7, n=2)
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                      temperature=1.0, seed=7, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    spec = out.model_extra["spec_decode"]  # both choices' figures together
    assert sum(spec["num_accepted_tokens_per_pos"]) == spec["num_accepted_tokens"]
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                       temperature=0)
    text = greedy.choices[0].text
    stop = text.strip()[:2]
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


def test_usage_with_a_stop_string_counts_tokens_through_the_stop_on_every_arm(served):
    """A speculative step commits several tokens at once, some past the stop string; usage
    counts only those through the token that completes it, so it does not depend on the arm."""
    client = oai(served)
    prompt = "1, 2, 3, 4, 5, 6, 7, 8,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"arm": "none"}).choices[0].text
    stop = full.strip().split()[2]  # the third number on: several steps into the text
    counts = {}
    for arm in ("none", "ngram_tree", "hybrid"):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                        temperature=0, stop=[stop], extra_body={"arm": arm})
        assert out.choices[0].finish_reason == "stop"
        assert out.choices[0].text == full[: full.find(stop)]
        counts[arm] = out.usage.completion_tokens
    assert len(set(counts.values())) == 1, counts
    assert 1 <= counts["none"] < 24


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "arm": "no-such-arm"}, "arm"),
    ({"prompt": "hi", "n": 99}, "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_completion_tokens": 100000}, "max_completion_tokens"),
    # Fields the server does not implement are refused, never silently ignored.
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    # Unknown fields too: a misspelt limit would otherwise decode the default, silently.
    ({"prompt": "hi", "max_token": 5}, "max_token"),
    ({"prompt": "hi", "repetition_penalty": 1.2}, "repetition_penalty"),
    # No limit asked and a prompt that fills the context: nothing left to generate.
    ({"prompt": [100 + i % 900 for i in range(8192)]}, "prompt"),
])
def test_bad_requests_get_400_in_openai_shape(served, body, param):
    resp = httpx.post(served.base_url + "/v1/completions", json=body, headers=served.headers,
                      timeout=60)
    assert resp.status_code in (400, 413), resp.text
    if resp.status_code == 400:
        assert _error(resp)["param"] == param


def test_prompt_past_context_is_400_and_body_limit_413(served):
    resp = httpx.post(served.base_url + "/v1/completions", headers=served.headers, timeout=60,
                      json={"prompt": [100 + i % 900 for i in range(8150)], "max_tokens": 100})
    assert resp.status_code == 400, resp.text
    assert _error(resp)["code"] == "context_length_exceeded"
    resp = httpx.post(served.base_url + "/v1/completions", headers=served.headers, timeout=60,
                      json={"prompt": "word " * 40000, "max_tokens": 4})
    assert resp.status_code == 413
    assert _error(resp)["code"] == "body_too_large"


def test_chunked_body_past_the_limit_is_413(served):
    """A body sent without a length (chunked) is counted as it arrives."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"word " * 200
        yield b'", "max_tokens": 4}'

    resp = httpx.post(served.base_url + "/v1/completions", content=chunks(), timeout=60,
                      headers={**served.headers, "Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert _error(resp)["code"] == "body_too_large"
    small = httpx.post(served.base_url + "/v1/completions", timeout=120,
                       content=iter([b'{"prompt": "Hello", ', b'"max_tokens": 2}']),
                       headers={**served.headers, "Content-Type": "application/json"})
    assert small.status_code == 200, small.text


def test_nulls_neutral_values_and_unknown_fields_are_accepted(served):
    """What OpenAI clients send when a caller passes None or a default explicitly."""
    resp = httpx.post(served.base_url + "/v1/completions", headers=served.headers, timeout=120,
                      json={"prompt": "Hello", "max_tokens": 2, "temperature": None,
                            "top_p": None, "n": None, "stream": None, "logprobs": None,
                            "presence_penalty": 0, "frequency_penalty": 0.0, "echo": False,
                            "best_of": 1, "user": "someone", "metadata": {"k": "v"},
                            # OpenAI fields this server does not know, sent as null: absent.
                            "reasoning_effort": None, "verbosity": None, "audio": None,
                            "web_search_options": None})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 1
    chat = oai(served).chat.completions.create(
        model=MODEL, max_tokens=2, temperature=0, logprobs=False, tools=[],
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
                  {"role": "user", "content": "Hi again"}])
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_chat_roles_developer_is_system_and_tool_calls_are_refused(served):
    def chat(messages: list[dict]) -> httpx.Response:
        return httpx.post(served.base_url + "/v1/chat/completions", headers=served.headers,
                          timeout=120, json={"messages": messages, "max_tokens": 4,
                                             "temperature": 0})

    question = {"role": "user", "content": "Name a colour."}
    as_system = chat([{"role": "system", "content": "Answer in French."}, question])
    as_developer = chat([{"role": "developer", "content": "Answer in French."}, question])
    assert as_system.status_code == as_developer.status_code == 200, as_developer.text
    assert (as_developer.json()["choices"][0]["message"]["content"]
            == as_system.json()["choices"][0]["message"]["content"])
    assert (as_developer.json()["usage"]["prompt_tokens"]
            == as_system.json()["usage"]["prompt_tokens"])
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    refused = chat([question, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": "blue", "tool_call_id": "c1"}])
    assert refused.status_code == 400 and _error(refused)["param"] == "messages", refused.text


def test_model_retrieve(served):
    assert oai(served).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai(served).models.retrieve("gpt-9")


def test_unknown_model_and_malformed_json(served):
    resp = httpx.post(served.base_url + "/v1/completions", headers=served.headers,
                      json={"model": "gpt-9", "prompt": "hi"})
    assert resp.status_code == 404 and _error(resp)["code"] == "model_not_found"
    resp = httpx.post(served.base_url + "/v1/completions", content=b"{not json",
                      headers={**served.headers, "Content-Type": "application/json"})
    assert resp.status_code == 400
    _error(resp)


def test_api_key_required(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.post(served.base_url + "/v1/completions", json={"prompt": "hi"},
                          headers=headers)
        assert resp.status_code == 401
        assert _error(resp)["type"] == "authentication_error"
    assert httpx.get(served.base_url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base_url + "/v1", api_key="nope",
                      max_retries=0).models.list()


def test_back_pressure_503_with_retry_after(served):
    body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 48}

    def post(_):
        return httpx.post(served.base_url + "/v1/completions", json=body,
                          headers=served.headers, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers.get("Retry-After", 0)) >= 1, (rejected.headers, rejected.text)
    assert _error(rejected)["code"] == "overloaded"


def test_sdk_retries_503_until_served(served):
    """Ten requests at once overflow a replica (3 running, 2 queued): some are answered 503, and
    the SDK waits the Retry-After (1 s or more) and sends them again until all are served."""
    body = {"prompt": "Once upon a time, a dragon", "max_tokens": 32}
    delays = []  # every retry's wait, from every thread (list.append is atomic)

    def sleep(seconds):
        delays.append(seconds)
        time.sleep(seconds)

    def sdk_call(_):
        with S3DClient(served.base_url, api_key=served.api_key, max_retries=30,
                       timeout=300, sleep=sleep) as client:
            return client.completions.create(**body)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(sdk_call, range(10)))
    assert all(r.usage.completion_tokens >= 1 for r in results), results
    assert all(r.spec_decode is not None for r in results)
    assert delays, "no request was answered 503 and retried"
    assert min(delays) >= 1, delays  # the server's Retry-After, not a connection's backoff


def test_sdk_sync_and_async(served):
    with S3DClient(served.base_url, api_key=served.api_key) as client:
        chat = client.chat.completions.create(
            messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8, temperature=0)
        assert chat.choices[0].message.content
        assert chat.spec_decode.num_spec_steps >= 1
        chunks = list(client.completions.create(prompt="The sky is", max_tokens=6,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices)

    async def run():
        async with AsyncS3DClient(served.base_url, api_key=served.api_key) as client:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": "Name a color."}], max_tokens=6,
                temperature=0, stream=True)
            return [c async for c in stream]

    chunks = asyncio.run(run())
    assert any(c.spec_decode is not None for c in chunks)


def test_disconnect_mid_stream_frees_the_slot(served):
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", served.base_url + "/v1/completions", headers=served.headers,
                           json={"prompt": "Write a very long essay.", "max_tokens": 400,
                                 "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    break
    deadline = time.time() + 60
    while served.decoder_queue_length() != 0:
        assert time.time() < deadline, "slot not freed after disconnect"
        time.sleep(0.5)


def test_statistics_reach_redis(served):
    import redis

    oai(served).completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=8,
                                   temperature=0, extra_body={"arm": "ngram_tree"})
    client = redis.Redis.from_url(served.redis_url)
    deadline = time.time() + 30
    while True:
        keys = [k.decode() for k in client.scan_iter(served.prefix + ":*")]
        if any("ngram_tree" in k for k in keys):
            break
        assert time.time() < deadline, keys
        time.sleep(0.5)
    for key in keys:
        if client.type(key) == b"hash":
            for value in client.hgetall(key).values():
                float(value)  # numbers only: no prompt text in the store


def test_recorded_decode_time_is_each_choice_s_own(served):
    """A replica decodes one step at a time, so its requests' own decoding times add up to at
    most the wall time they shared: the ``n`` choices of one request, decoded side by side,
    each once recorded the whole time after its first token (a busy replica made every arm
    look slower, and whichever ran in a burst looked worst). The suite's replica has 3 decoding
    slots (``max_ongoing_requests``): the fourth choice waits for one and still answers."""
    import redis

    prompt = "The river valley was settled by farmers long before the town grew. " * 24
    started = time.perf_counter()
    out = oai(served).completions.create(model=MODEL, prompt=prompt, max_tokens=12, n=4,
                                         temperature=1.3, seed=7, extra_body={"arm": "none"})
    wall = time.perf_counter() - started
    assert out.usage.prompt_tokens >= 256  # a bucket of its own in this suite: prose.thi.pm
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    client = redis.Redis.from_url(served.redis_url)
    key = f"{served.prefix}:{STATS_MODEL}:prose.thi.pm:none"
    deadline = time.time() + 30
    while float(client.hget(key, "lifetime_requests") or 0) < 4:
        assert time.time() < deadline, client.hgetall(key)
        time.sleep(0.5)
    record = {k.decode(): float(v) for k, v in client.hgetall(key).items()}
    assert record["lifetime_requests"] == 4
    assert 0 < record["decode_time_s"] <= wall
    assert record["num_output_tokens"] > 4


def test_every_documented_metric_is_exported(served):
    """The README's Metrics section names what Ray exports: after a pinned request on an n-gram
    arm and a routed one, every name is in the Prometheus export (Ray's ``ray_`` prefix;
    counters end in ``_total``, histograms have ``_count``), the replicas' statistics store is
    up, and both requests' router decisions were timed."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    # A counter of losses appears from its first increment (Ray refuses increments of zero).
    names = [name for name in re.findall(r"`([a-z0-9_]+)`", section)
             if name.startswith(("s3d_", "spec_decode_")) and name != "s3d_stats_dropped_writes"]
    assert "s3d_router_decision_s" in names and len(names) >= 13
    before = served.metrics().get("ray_s3d_router_decision_s_count", [])
    oai(served).completions.create(model=MODEL, prompt="1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,",
                                   max_tokens=16, temperature=0,
                                   extra_body={"arm": "ngram_tree"})
    oai(served).completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=4,
                                   temperature=0)

    def missing(samples: dict) -> list[str]:
        return [name for name in names if not {f"ray_{name}", f"ray_{name}_total",
                                               f"ray_{name}_count"} & samples.keys()]

    def decided(samples: dict) -> float:
        return sum(v for _, v in samples.get("ray_s3d_router_decision_s_count", []))

    samples = served.eventually_metrics(
        lambda samples: not missing(samples) and decided(samples) >= sum(
            v for _, v in before) + 2)
    # Both deployments say whether they reach Redis: the replicas write, the ingress reads.
    # (The deployments' samples: a unit test's replica built in this process, with no Redis
    # behind it, exports its own, without a deployment, once this process joined Ray.)
    available = [(labels, v) for labels, v in samples["ray_s3d_stats_store_available"]
                 if 'deployment=""' not in labels]
    assert [v for _, v in available] == [1.0] * len(available), available
    assert all(any(f'deployment="{name}"' in labels for labels, _ in available)
               for name in ("Ingress", "Decoder")), available
    assert any('arm="ngram_tree"' in labels and 'pinned="true"' in labels
               for labels, _ in samples["ray_s3d_arm_chosen_total"])


def test_router_sets_a_layer_skip_arms_depth_from_fleet_statistics(served):
    """Statistics another replica wrote to Redis make the router send a code request (at a
    temperature bucket no other test uses) to the skip chain, and the chain's recorded
    acceptance curve (nothing past the first draft is ever accepted, a draft level costs as much
    as a verify) makes it draft one level deep."""
    import redis

    from router.store import RedisStatsStore, StatsKey
    from workers.arm import Profile
    from workers.engine import BUNDLED_PROFILE
    from workers.stats import SpecDecodeStats

    profile = Profile.load(BUNDLED_PROFILE)
    chain = next(a for a in profile.arms if a.drafter == "skip_chain")
    assert chain.depth > 1
    bucket = "code.tlo.ps"

    async def write_fleet_statistics() -> None:
        store = RedisStatsStore(served.redis_url, prefix=served.prefix)
        await store.start()
        for arm in profile.arms:
            for _ in range(40):
                stats = SpecDecodeStats(num_output_tokens=100)
                for _ in range(50):
                    accepted = 1 if arm is chain else 0
                    stats.observe_step(chain.depth, accepted, 0.05 * chain.depth, 0.05,
                                       chain.depth)
                # the chain: 1000 tokens/s; every other arm 10
                store.record(StatsKey(STATS_MODEL, bucket, arm.name), stats,
                             0.1 if arm is chain else 10.0)
        assert await store.flush()
        await store.close()

    asyncio.run(write_fleet_statistics())
    prompt = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
    try:
        deadline = time.time() + 60
        while True:  # the ingress reads the store in the background
            out = oai(served).completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                                 temperature=0.5)
            spec = out.model_extra["spec_decode"]
            if spec["arm"] == chain.name:
                break
            assert time.time() < deadline, spec
            time.sleep(0.5)
        assert spec["depth"] == 1
    finally:
        keys = RedisStatsStore(served.redis_url, prefix=served.prefix)
        redis.Redis.from_url(served.redis_url).delete(
            *(keys.hash_key(StatsKey(STATS_MODEL, bucket, arm.name)) for arm in profile.arms))


def test_serve_config_file_validates():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((Path(__file__).parents[2] / "serve_app" / "serve_config.yaml")
                          .read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(
        ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(data)
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    from serve_app.config import load_config

    load_config(overrides=app.args)
