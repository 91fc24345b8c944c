"""`s3d serve` on one machine: local Ray, a child `redis-server`, the Serve app, clean shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack

import httpx

from serve_app.config import ServeConfig


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(echo) -> tuple[subprocess.Popen | None, str | None]:
    """A private redis-server on loopback, or ``(None, None)`` with a warning when unavailable."""
    binary = shutil.which("redis-server")
    if binary is None:
        echo("WARNING: redis-server is not installed; using the in-process statistics store "
             "(each process learns alone). `make install` installs redis-server.")
        return None, None
    port = 6379 if _port_free(6379) else _free_port()
    workdir = tempfile.mkdtemp(prefix="s3d-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    echo("WARNING: redis-server did not start; using the in-process statistics store.")
    return None, None


def serve_locally(config: ServeConfig, host: str, port: int, echo, num_cpus: int | None) -> None:
    import ray
    from ray import serve

    from serve_app.app import build_app
    from workers.model import resolve_model_path

    resolve_model_path(config.model)  # prepares the bundled model once, before any replica
    with ExitStack() as stack:
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False)
        stack.callback(ray.shutdown)
        serve.start(http_options={"host": host, "port": port})
        stack.callback(serve.shutdown)
        if config.redis_url is None:
            proc, url = start_redis(echo)
            if proc is not None:
                # Same process group: Ctrl-C reaches it even if this process dies first.
                stack.callback(lambda: (proc.terminate(), proc.wait(10)))
                config = config.model_copy(update={"redis_url": url})
                echo(f"statistics store: {url} (child redis-server)")
        serve.run(build_app(config.model_dump()), name="s3d", route_prefix="/", blocking=False)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{port}"
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the application did not become healthy in 10 minutes")
            time.sleep(1)
        auth = f" -H 'Authorization: Bearer {config.api_keys[0]}'" if config.api_keys else ""
        echo(f"\ns3d-serve is up at {url} (OpenAI-compatible: {url}/v1)\n\n"
             f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
             f"    -d '{{\"model\": \"{config.served_model_name}\", \"messages\": "
             f"[{{\"role\": \"user\", \"content\": \"Write a haiku about Python.\"}}], "
             f"\"max_tokens\": 64}}'\n\nCtrl-C stops it.")
        stopped = {"flag": False}

        def _stop(signum, frame):
            stopped["flag"] = True

        # Both set explicitly: a process started in the background inherits SIGINT ignored.
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while not stopped["flag"]:
            time.sleep(0.5)
        echo("shutting down...")
