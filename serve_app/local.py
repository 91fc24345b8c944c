"""`s3d serve` on one machine: local Ray, a child `redis-server`, the Serve app, clean shutdown."""

from __future__ import annotations

import errno
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
    """A reason `s3d serve` cannot start, said to the user without a traceback; ``exit_code``
    2 when a setting is refused before anything starts (a usage error), 1 for a failure after."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _bind_error(port: int, host: str = "127.0.0.1") -> OSError | None:
    """Why ``host:port`` cannot be bound now, as a server binds it (address reuse on, so a
    socket of a stopped server waiting out TIME_WAIT does not count), or None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError as exc:  # a host that does not resolve too (socket.gaierror)
            return exc


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    return _bind_error(port, host) is None


def _free_port(avoid: int) -> int:
    """A port free on loopback now, never ``avoid`` (the HTTP port, not yet bound: Serve binds
    it after redis-server has started, and the kernel may hand it out meanwhile)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != avoid:
            return port


def _prctl():
    """Linux's ``prctl`` from libc, or None elsewhere."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent_fn():
    """A ``preexec_fn`` for a child that Linux ends when this process dies (a `kill -9` of
    `s3d serve` must not leave a redis-server behind); None elsewhere.

    libc and its ``prctl`` are looked up here, in the parent: loading a library in the forked
    child of a process with threads (torch's, Ray's) can deadlock on a lock held by a thread
    that does not exist in the child. The child only calls the function. Called from the main
    thread: the signal comes when the thread that forked the child ends, not the process."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return die_with_parent


def _answering_child(proc: subprocess.Popen, port: int) -> bool | None:
    """Whether the Redis answering on ``port`` is ``proc``: True, False (someone else's: another
    process took the port first and the child exits, unable to bind it), or None when nothing
    answers yet."""
    import redis

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return None
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
            pid = client.info("server").get("process_id")
    except redis.RedisError:  # e.g. one that asks for a password: not the child's
        pid = None
    return proc.poll() is None and pid == proc.pid


def start_redis(echo, stack: ExitStack, http_port: int) -> str | None:
    """A private redis-server on loopback, stopped (and its directory removed) when ``stack``
    closes; its URL, or None with a warning when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        echo("WARNING: redis-server is not installed; using the in-process statistics store "
             "(each process learns alone). Install it (`sudo apt-get install -y redis-server`, "
             "or as root without sudo) and start again.")
        return None
    workdir = tempfile.mkdtemp(prefix="s3d-redis-")
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    preexec = _die_with_parent_fn()
    port = 6379 if http_port != 6379 and _port_free(6379) else _free_port(http_port)
    # A port free when chosen may be taken before the child binds it: the child then exits, and
    # another port is tried.
    for _attempt in range(3):
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save",
                                 "", "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=preexec, start_new_session=True)
        stack.callback(_stop_process, proc)
        deadline = time.time() + 10
        while time.time() < deadline:
            if _answering_child(proc, port):
                return f"redis://127.0.0.1:{port}/0"
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is None:  # alive but not answering in 10 s: another port will not help
            break
        port = _free_port(http_port)
    echo("WARNING: redis-server did not start; using the in-process statistics store.")
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _deploy_failure(exc: RuntimeError) -> str:
    """Why the application did not deploy, in a line per failed deployment: the last line of
    its message, the exception its replicas' constructor raised (Serve's own message only says
    which deployments failed), else that message's last line."""
    from ray import serve

    try:
        app = serve.status().applications.get("s3d")
        reasons = [f"{name}: {_last_line(d.message)}"
                   for name, d in (app.deployments.items() if app else ())
                   if d.status in ("UNHEALTHY", "DEPLOY_FAILED") and d.message.strip()]
    except Exception:  # the status only explains: never hide the failure behind another
        reasons = []
    return "; ".join(reasons) or _last_line(str(exc)) or repr(exc)


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
    error = _bind_error(port, host)
    if error is not None and error.errno == errno.EADDRINUSE:
        raise LocalServeError(f"port {port} on {host} is in use (another s3d serve?): stop what "
                              "holds it, or pass --port")
    if error is not None:  # a host that does not resolve, an address not of this machine, ...
        raise LocalServeError(f"cannot bind {host}:{port}: {error.strerror or error}")
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
            url = start_redis(echo, stack, port)
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
        application = build_app(config.model_dump())
        try:
            serve.run(application, name="s3d", route_prefix="/", blocking=False)
        except RuntimeError as exc:  # DEPLOY_FAILED: e.g. a replica that cannot load the model
            raise LocalServeError(f"the application did not deploy: {_deploy_failure(exc)}; "
                                  "Ray's logs are under /tmp/ray/session_latest",
                                  exit_code=1) from None
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
                                          "minutes; Ray's logs are under /tmp/ray/session_latest",
                                          exit_code=1)
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
