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


class LocalServeError(RuntimeError):
    """A reason `s3d serve` cannot start, said to the user without a traceback."""


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now, as a server binds it (address reuse on, so a
    socket of a stopped server waiting out TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to end it when its parent dies (a `kill -9` of
    `s3d serve` must not leave a redis-server behind). Elsewhere: nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_redis(echo, stack: ExitStack) -> str | None:
    """A private redis-server on loopback, stopped (and its directory removed) when ``stack``
    closes; its URL, or None with a warning when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        echo("WARNING: redis-server is not installed; using the in-process statistics store "
             "(each process learns alone). `make install` installs redis-server.")
        return None
    port = 6379 if _port_free(6379) else _free_port()
    workdir = tempfile.mkdtemp(prefix="s3d-redis-")
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent, start_new_session=True)
    stack.callback(_stop_process, proc)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    echo("WARNING: redis-server did not start; using the in-process statistics store.")
    return None


def _stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _catch_signals() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def serve_locally(config: ServeConfig, host: str, port: int, echo, num_cpus: int | None) -> None:
    """Serve until Ctrl-C or SIGTERM; raises ``LocalServeError`` when it cannot start."""
    if not _port_free(port, host):
        raise LocalServeError(f"port {port} on {host} is in use (another s3d serve?): stop what "
                              "holds it, or pass --port")
    # Ctrl-C or SIGTERM at any moment, start-up included, unwinds the stack below: the child
    # redis-server, Serve and Ray are stopped (a second one hurries the current step). Both set
    # explicitly: a process started in the background inherits SIGINT ignored.
    _catch_signals()
    try:
        _serve(config, host, port, echo, num_cpus)
    except KeyboardInterrupt:  # during start-up, or a second one while shutting down
        echo("stopped.")


def _serve(config: ServeConfig, host: str, port: int, echo, num_cpus: int | None) -> None:
    import ray
    from ray import serve

    from serve_app.app import build_app
    from workers.model import resolve_model_path

    with ExitStack() as stack:
        resolve_model_path(config.model)  # prepares the bundled model once, before any replica
        if config.redis_url is None:
            # Started first, so it is stopped last, after Serve has drained its requests.
            url = start_redis(echo, stack)
            if url is not None:
                config = config.model_copy(update={"redis_url": url})
                echo(f"statistics store: {url} (child redis-server)")
        # A local cluster of its own, even with RAY_ADDRESS set or a `ray start` cluster here:
        # shutting down must not stop someone else's Serve.
        stack.callback(ray.shutdown)  # first: an interrupted ray.init is shut down too
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2),
                 include_dashboard=False)
        _catch_signals()  # ray.init puts its own SIGTERM handler (a crash report) in place
        serve.start(http_options={"host": host, "port": port})
        stack.callback(serve.shutdown)
        serve.run(build_app(config.model_dump()), name="s3d", route_prefix="/", blocking=False)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{port}"
        deadline = time.time() + 600
        with httpx.Client(trust_env=False, timeout=5) as http:  # loopback: never via a proxy
            while True:
                try:
                    if http.get(url + "/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise LocalServeError("the application did not become healthy in 10 "
                                          "minutes; Ray's logs are under /tmp/ray/session_latest")
                time.sleep(1)
        auth = f" -H 'Authorization: Bearer {config.api_keys[0]}'" if config.api_keys else ""
        echo(f"\ns3d-serve is up at {url} (OpenAI-compatible: {url}/v1)\n\n"
             f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
             f"    -d '{{\"model\": \"{config.served_model_name}\", \"messages\": "
             f"[{{\"role\": \"user\", \"content\": \"Write a haiku about Python.\"}}], "
             f"\"max_tokens\": 64}}'\n\nCtrl-C stops it.")
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            echo("shutting down...")
