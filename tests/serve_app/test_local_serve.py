"""`s3d serve`, the README's first command, run as a user runs it: a process of its own (its own
local Ray, its own child redis-server), one request from the official OpenAI client, then
SIGTERM, after which nothing it started may be left running."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.serve, pytest.mark.model]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Serve:
    """`s3d serve --port PORT` in a process group of its own, as a shell runs a command (Ctrl-C
    reaches the whole group), with a clean environment: no S3D_* variables of the developer's,
    and a RAY_ADDRESS of a cluster that does not exist (its Ray must be its own whatever
    RAY_ADDRESS says)."""

    def __init__(self):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("S3D_")}
        env.update(S3D_TORCH_THREADS="2", S3D_DEFAULT_MAX_TOKENS="8", RAY_ADDRESS="127.0.0.1:9")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.cli", "serve", "--port", str(self.port),
             "--num-cpus", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.said: list[str] = []
        self.reader = threading.Thread(
            target=lambda: [self.lines.put(line) for line in self.proc.stderr], daemon=True)
        self.reader.start()

    def wait_for(self, text: str, seconds: float = 600) -> None:
        deadline = time.time() + seconds
        while not any(text in line for line in self.said):
            assert time.time() < deadline, self.output
            try:
                self.said.append(self.lines.get(timeout=1))
            except queue.Empty:  # all it said is read: is it still running?
                assert self.proc.poll() is None, self.output

    @property
    def output(self) -> str:
        while not self.lines.empty():
            self.said.append(self.lines.get())
        return "".join(self.said)

    def redis_port(self) -> int:
        store = re.search(r"statistics store: redis://127\.0\.0\.1:(\d+)/0", self.output)
        assert store, self.output
        return int(store.group(1))

    def stop(self, signum: int, group: bool = False) -> int:
        """Its exit code after ``signum`` (to the whole group: Ctrl-C); killed, group and all,
        if it does not exit in 3 minutes."""
        try:
            if group:
                try:
                    os.killpg(self.proc.pid, signum)
                except ProcessLookupError:  # it has exited already (and failed the test)
                    pass
            else:
                self.proc.send_signal(signum)
            return self.proc.wait(timeout=180)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.reader.join(timeout=5)  # its last lines

    def left_running(self, seconds: float = 30) -> list[str]:
        """Processes of its group still running (zombies aside) after ``seconds`` at most."""
        deadline = time.time() + seconds
        while True:
            alive = []
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    text = stat.read_text()
                except OSError:
                    continue
                name, rest = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1]
                state, _ppid, pgrp = rest.split()[:3]
                if int(pgrp) == self.proc.pid and state != "Z":
                    alive.append(name)
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.5)


def test_the_child_redis_is_never_someone_elses(monkeypatch):
    """A port free when chosen but taken by another Redis before the child binds it: the
    connection check reached that one, and `s3d serve` used someone else's store."""
    from contextlib import ExitStack

    from serve_app import local
    from tests.conftest import RedisServer

    other = RedisServer()
    other.start()
    try:
        ports = iter([other.port, free_port()])
        monkeypatch.setattr(local, "_port_free", lambda *args: False)  # 6379 taken
        monkeypatch.setattr(local, "_free_port", lambda avoid: next(ports))
        with ExitStack() as stack:
            url = local.start_redis(print, stack, http_port=8000)
            assert url is not None and f":{other.port}/" not in url
    finally:
        other.stop()


def test_s3d_serve_answers_and_stops_leaving_nothing_running():
    serve = Serve()
    redis_port = None
    try:
        serve.wait_for("s3d-serve is up")
        redis_port = serve.redis_port()
        assert _listening(redis_port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve.port}/v1", api_key="unused",
                               max_retries=0, timeout=300)
        out = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi!"}],
            temperature=0)
        assert out.choices[0].message.content and out.usage.completion_tokens <= 8
    finally:
        code = serve.stop(signal.SIGTERM)
    assert code == 0, serve.output
    assert not _listening(serve.port) and not _listening(redis_port)
    assert serve.left_running() == [], serve.output
