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


def test_s3d_serve_answers_and_stops_leaving_nothing_running():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app.cli", "serve", "--port", str(port), "--num-cpus", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "S3D_TORCH_THREADS": "2", "S3D_DEFAULT_MAX_TOKENS": "8"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    said: list[str] = []
    try:
        deadline = time.time() + 600
        while not any("s3d-serve is up" in line for line in said):
            assert proc.poll() is None, "".join(said)
            assert time.time() < deadline, "".join(said)
            try:
                said.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        store = re.search(r"statistics store: redis://127\.0\.0\.1:(\d+)/0", "".join(said))
        assert store, "".join(said)
        redis_port = int(store.group(1))
        assert _listening(redis_port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=300)
        out = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi!"}],
            temperature=0)
        assert out.choices[0].message.content and out.usage.completion_tokens <= 8
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    assert code == 0, "".join(said)
    assert not _listening(port) and not _listening(redis_port)
