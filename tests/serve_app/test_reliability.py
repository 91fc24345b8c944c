"""Faults a fleet meets, against the real application: Redis outages, a replica killed
mid-stream, a storm of disconnects. Runs after the API tests (it kills the decoder)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
import redis

pytestmark = [pytest.mark.serve, pytest.mark.reliability]


def _complete(served, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    return httpx.post(served.base_url + "/v1/completions", headers=served.headers, timeout=300,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            **extra})


def _stats_total(served) -> float:
    client = redis.Redis.from_url(served.redis_url, socket_timeout=2)
    total = 0.0
    for key in client.scan_iter(served.prefix + ":*"):
        if client.type(key) == b"hash":
            total += float(client.hget(key, "requests") or 0)
    return total


def test_redis_outage_fails_no_request_and_writing_resumes(served, redis_server):
    """Redis stopped under load: every request is served, the replicas' and the ingress's
    store-availability gauges drop to 0 and come back to 1, and statistics land again by
    themselves."""
    results: list[int] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            results.append(_complete(served, "def square(x):", 6).status_code)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(3)
        redis_server.stop()
        down = time.time()
        # The replicas and the ingress say so in their metrics while Redis is down...
        served.eventually_metrics(lambda samples: all(any(
            f'deployment="{name}"' in labels and v == 0.0
            for labels, v in samples.get("ray_s3d_stats_store_available", []))
            for name in ("Ingress", "Decoder")))
        time.sleep(max(0.0, 8 - (time.time() - down)))
        redis_server.start()  # same port, empty: writes must land again by themselves
        deadline = time.time() + 60
        while _stats_total(served) == 0:
            assert time.time() < deadline, "statistics writing did not resume after Redis came back"
            time.sleep(1)
        # ...and again when it is back (the deployments' series: unit tests in this process
        # may have exported their own, with an empty deployment label).
        served.eventually_metrics(lambda samples: all(
            v == 1.0 for labels, v in samples.get("ray_s3d_stats_store_available", [])
            if 'deployment=""' not in labels) and all(any(
                f'deployment="{name}"' in labels
                for labels, _ in samples.get("ray_s3d_stats_store_available", []))
                for name in ("Ingress", "Decoder")))
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=300)
    assert results and all(code == 200 for code in results), results
    health = httpx.get(served.base_url + "/healthz").json()
    assert health["status"] == "ok"


def test_disconnect_storm_frees_every_slot(served):
    def open_and_drop(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", served.base_url + "/v1/completions",
                               headers=served.headers,
                               json={"prompt": f"Story number {i}:", "max_tokens": 300,
                                     "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        break

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(open_and_drop, range(5)))
    deadline = time.time() + 60
    while served.decoder_queue_length() != 0:
        assert time.time() < deadline, "slots not freed after the disconnect storm"
        time.sleep(0.5)
    assert _complete(served, "Hello").status_code == 200


def _kill_decoders() -> None:
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "Decoder" in a["name"]]
    assert actors, "no decoder replica actor found"
    for actor in actors:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


def test_replica_killed_mid_request_is_served_by_its_replacement(served):
    """Nothing of a non-streamed request has reached its client when its replica dies, so the
    ingress sends it again; the client sees one ordinary answer."""
    body = {"prompt": "Count with me: 1, 2, 3,", "max_tokens": 160, "arm": "none"}
    reference = _complete(served, **body)
    assert reference.status_code == 200, reference.text
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_complete, served, **body)
        deadline = time.time() + 60
        while served.decoder_queue_length() == 0:  # the replica has the request
            assert not pending.done() and time.time() < deadline, "the request never started"
            time.sleep(0.1)
        _kill_decoders()
        resp = pending.result(timeout=600)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]


def test_replica_killed_mid_stream_ends_with_error_event_then_recovers(served):

    events: list[str] = []
    with httpx.Client(timeout=300) as client:
        with client.stream("POST", served.base_url + "/v1/completions", headers=served.headers,
                           json={"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400,
                                 "temperature": 0, "arm": "none", "stream": True}) as resp:
            killed = False
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if not killed and line.startswith("data: {"):
                    _kill_decoders()
                    killed = True
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert "error" in error, f"the stream finished before the replica died: {events[-3:]}"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    deadline = time.time() + 300
    while True:
        try:
            if _complete(served, "Hello again", 4).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "Serve did not replace the killed replica"
        time.sleep(2)
