"""The `s3d` command line, run in process on the bundled model."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from serve_app.cli import app


def test_generate_runs_a_pinned_arm_and_refuses_an_unknown_one():
    runner = CliRunner()
    ok = runner.invoke(app, ["generate", "def add(a, b):", "--raw", "--arm", "s3d_skip",
                             "--max-tokens", "4"])
    assert ok.exit_code == 0, ok.output
    assert "arm s3d_skip" in ok.output
    bad = runner.invoke(app, ["generate", "hi", "--arm", "s3d", "--max-tokens", "2"])
    assert bad.exit_code == 2
    assert "unknown arm 's3d'" in bad.output and "s3d_fused" in bad.output


def words(output: str) -> str:
    """A CLI message without the error box's frame and wrapping."""
    return " ".join(output.replace("│", " ").split())


def test_search_refuses_unknown_kinds_before_loading_anything(tmp_path):
    from workers.engine import BUNDLED_PROFILE

    runner = CliRunner()
    out = tmp_path / "profile.json"
    bad = runner.invoke(app, ["search", "--out", str(out), "--kinds", "hybird",
                              "--skip-sets-from", str(BUNDLED_PROFILE)])
    assert bad.exit_code == 2 and "'hybird'" in words(bad.output)
    assert "s3d, hybrid, s3d_skip" in words(bad.output)
    alone = runner.invoke(app, ["search", "--out", str(out), "--kinds", "hybrid"])
    assert alone.exit_code == 2 and "give the profile" in words(alone.output)
    # A temperature that decodes greedily, and options a remeasurement would ignore.
    tiny = runner.invoke(app, ["search", "--out", str(out), "--remeasure", str(BUNDLED_PROFILE),
                               "--temperature", "1e-7"])
    assert tiny.exit_code == 2 and "decoding is greedy" in words(tiny.output)
    ignored = runner.invoke(app, ["search", "--out", str(out), "--remeasure",
                                  str(BUNDLED_PROFILE), "--adapter", "a.safetensors"])
    assert ignored.exit_code == 2 and "measures a profile's arms as they are" in words(
        ignored.output)
    assert not out.exists()


def test_bench_refuses_bad_temperatures_before_loading_anything(tmp_path):
    runner = CliRunner()
    for bad in ("0,hot", "0,-1", ",", "nan"):
        result = runner.invoke(app, ["bench", "--out", str(tmp_path), "--temperatures", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert "--temperatures" in result.output
    both = runner.invoke(app, ["bench", "--out", str(tmp_path), "--temperatures", "0,1",
                               "--temperature", "0.7"])
    said = " ".join(both.output.replace("│", " ").split())  # the error box wraps its lines
    assert both.exit_code == 2 and "either --temperature or --temperatures" in said
    # No methods at all, and names neither a method nor an arm of the profile: refused at once.
    empty = runner.invoke(app, ["bench", "--out", str(tmp_path), "--methods", ","])
    assert empty.exit_code == 2 and "no methods given" in words(empty.output)
    unknown = runner.invoke(app, ["bench", "--out", str(tmp_path), "--methods",
                                  "vanilla,warp_drive"])
    said = words(unknown.output)
    assert unknown.exit_code == 2 and "unknown methods ['warp_drive']" in said
    assert "ngram_tree_code" in said  # the profile's arms run by name
    assert not any(tmp_path.iterdir())


def test_serve_refuses_a_bad_config_and_a_port_in_use_before_starting_anything():
    import socket

    runner = CliRunner()
    bad = runner.invoke(app, ["serve", "--quantization", "8bit"])  # float32 compute
    assert bad.exit_code == 2 and "bfloat16" in bad.output
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        busy = runner.invoke(app, ["serve", "--port", str(port)])
    assert busy.exit_code == 2, busy.output
    assert f"port {port} on 127.0.0.1 is in use" in busy.output
    assert busy.exception is None or isinstance(busy.exception, SystemExit)


@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_serve_refuses_a_port_outside_1_to_65535_with_a_usage_error(port):
    """70000 and -1 ended in an OverflowError traceback (exit 1) from the port check; 0 passed
    it, started Ray and polled the health of port 0 for ten minutes."""
    result = CliRunner().invoke(app, ["serve", "--port", port])
    assert result.exit_code == 2, result.output
    said = words(result.output)
    assert "Invalid value for '--port'" in said
    assert ("less than or equal to 65535" if port == "70000"
            else "greater than or equal to 1") in said


def test_loadtest_fails_when_no_request_succeeds():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(app, ["loadtest", "--url", f"http://127.0.0.1:{port}",
                                      "--clients", "2", "--duration", "1"])
    assert result.exit_code == 1, result.output
    assert "no request succeeded" in result.output
    # two clients, pausing after each connection error: a handful of requests, not thousands
    sent = int(re.search(r"\| requests sent \| (\d+) \|", result.output).group(1))
    assert 2 <= sent <= 12 and f"connection: {sent}" in result.output


def test_train_refuses_another_models_checkpoint_with_a_message(tmp_path):
    import torch

    out = tmp_path / "adapter.safetensors"
    torch.save({"fingerprint": "another-model", "adapter": {}, "optimizer": None, "step": 3,
                "history": []}, out.with_suffix(".ckpt.pt"))
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--steps", "4"])
    assert result.exit_code == 2, result.output
    assert "another-model" in result.output and "--no-resume" in result.output
    assert not out.exists()
