"""One local Ray cluster and one Serve application for every serving test."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.conftest import free_port

API_KEY = "test-key-123"


class ServedApp:
    def __init__(self, base_url: str, prefix: str, redis_url: str, metrics_url: str):
        self.base_url = base_url
        self.prefix = prefix
        self.redis_url = redis_url
        self.metrics_url = metrics_url  # Ray's Prometheus export
        self.api_key = API_KEY

    def metrics(self) -> dict[str, list[tuple[str, float]]]:
        """The exported samples by metric name: each sample's labels and value."""
        samples: dict[str, list[tuple[str, float]]] = {}
        for line in httpx.get(self.metrics_url, timeout=10).text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            samples.setdefault(name, []).append((labels.rstrip("}"), float(value)))
        return samples

    def eventually_metrics(self, condition, timeout_s: float = 30.0) -> dict:
        """Scrape until ``condition(samples)`` holds (Ray exports every second here: the
        fixture asks for half a second, Ray's floor is one)."""
        deadline = time.time() + timeout_s
        while True:
            samples = self.metrics()
            if condition(samples):
                return samples
            if time.time() > deadline:
                gauges = {n: v for n, v in samples.items() if n.startswith("ray_s3d_stats")}
                raise AssertionError(f"metrics never met the condition; exported: "
                                     f"{sorted(n for n in samples if 's3d' in n or 'spec' in n)}"
                                     f"; store gauges: {gauges}")
            time.sleep(0.5)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}

    def decoder_queue_length(self) -> int:
        from ray import serve

        handle = serve.get_deployment_handle("Decoder", app_name="s3d")
        return handle.queue_length.remote().result(timeout_s=30)


@pytest.fixture(scope="session")
def served(redis_server):
    import ray
    from ray import serve

    from serve_app.app import build_app
    from workers.model import prepare_bundled_model

    prepare_bundled_model()
    port, metrics_port = free_port(), free_port()
    prefix = f"s3d:test:{uuid.uuid4().hex[:8]}"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
             _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({
        "redis_url": redis_server.url, "stats_prefix": prefix, "api_keys": [API_KEY],
        "max_ongoing_requests": 3, "max_queued_requests": 2, "torch_threads": 2,
        "max_tokens_limit": 512, "default_max_tokens": 16, "max_body_bytes": 100_000,
    })
    serve.run(app, name="s3d", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError("the Serve application did not become healthy")
        time.sleep(1)
    yield ServedApp(base, prefix, redis_server.url, f"http://127.0.0.1:{metrics_port}/metrics")
    serve.shutdown()
    ray.shutdown()
