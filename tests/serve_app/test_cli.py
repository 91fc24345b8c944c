"""The `s3d` command line, run in process on the bundled model."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

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


@pytest.fixture
def no_s3d_env(monkeypatch):
    """No ``S3D_*`` variables: a developer's own (S3D_MODEL, S3D_PORT...) would change what
    `s3d serve` is given."""
    for name in list(os.environ):
        if name.startswith("S3D_"):
            monkeypatch.delenv(name)


@pytest.fixture
def nothing_starts(monkeypatch, no_s3d_env):
    """A command that gets as far as loading the model or starting Ray fails the test: these
    settings must be refused before (in seconds, not after minutes of start-up)."""
    from workers.engine import Engine

    def started(*args, **kwargs):
        raise AssertionError("started although the settings should have been refused")

    monkeypatch.setattr("serve_app.local.serve_locally", started)
    monkeypatch.setattr(Engine, "load", classmethod(started))


def test_generate_refuses_an_unknown_arm_before_loading_the_model(nothing_starts):
    bad = CliRunner().invoke(app, ["generate", "hi", "--arm", "warp_drive"])
    assert bad.exit_code == 2, bad.output
    assert "unknown arm 'warp_drive'" in words(bad.output) and "s3d_fused" in bad.output


def test_train_refuses_skip_layers_that_are_not_numbers(nothing_starts, tmp_path):
    bad = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "a.safetensors"),
                                   "--skip-layers", "a,b"])
    assert bad.exit_code == 2, bad.output
    assert "--skip-layers" in bad.output and "'a,b'" in words(bad.output)


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


def test_bench_refuses_a_missing_prompt_file_and_an_out_it_cannot_create(nothing_starts,
                                                                          tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["bench", "--out", str(tmp_path / "out"), "--prompts",
                                  str(tmp_path / "no-such.jsonl")])
    assert missing.exit_code == 2, missing.output
    assert "--prompts" in missing.output and "no-such.jsonl" in words(missing.output)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    taken = runner.invoke(app, ["bench", "--out", str(a_file), "--limit", "1"])
    assert taken.exit_code == 2, taken.output  # was: after the whole run
    assert "--out" in taken.output and "cannot create folder" in words(taken.output)


def test_bench_refuses_an_empty_prompt_file_before_loading_the_model(nothing_starts, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    empty = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out"), "--prompts",
                                     str(blank)])
    assert empty.exit_code == 2, empty.output  # was: an IndexError after loading the model
    assert "--prompts" in empty.output and "holds no prompts" in words(empty.output)


def test_bench_refuses_a_method_without_its_arm_before_loading_the_model(nothing_starts,
                                                                         tmp_path):
    """A profile without the layer-skip arms: naming one is refused now, not after loading."""
    from workers.engine import generic_profile

    profile = tmp_path / "profile.json"
    generic_profile("another-model").save(profile)
    missing = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out"), "--profile",
                                       str(profile), "--methods", "vanilla,skip_chain"])
    assert missing.exit_code == 2, missing.output
    said = words(missing.output)
    assert "method 'skip_chain' needs an arm named 'skip_chain'" in said
    assert "the profile's arms: none, ngram_tree" in said


def test_bench_runs_by_default_the_methods_the_loaded_profile_has_arms_for(monkeypatch,
                                                                            no_s3d_env, tmp_path):
    """Another model's generic profile has no layer-skip or S3D arms: those methods are left out
    (they once ran, and failed after the model had loaded and the methods before had warmed up)."""
    from workers import bench as bench_mod
    from workers.engine import Engine, generic_profile

    profile = generic_profile("another-model")
    monkeypatch.setattr(Engine, "load", classmethod(
        lambda cls, *args, **kwargs: SimpleNamespace(profile=profile)))
    ran = []

    class Ran(Exception):
        pass

    class Bench(bench_mod.Bench):
        def __init__(self, engine, *args, **kwargs):
            self.engine = engine

        def run(self, methods):
            ran.append(methods)
            raise Ran

    monkeypatch.setattr(bench_mod, "Bench", Bench)
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--model", "owner/name"])
    assert isinstance(result.exception, Ran), result.output
    assert ran == [["hf_vanilla", "hf_prompt_lookup", "hf_early_exit", "vanilla", "ngram_tree",
                    "router", "router_thompson"]]


def test_serve_refuses_a_bad_config_and_a_port_in_use_before_starting_anything(no_s3d_env):
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


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])
def test_serve_says_why_it_cannot_bind_a_host(no_s3d_env, host):
    """Not "in use": a host that does not resolve, or an address not of this machine."""
    from tests.conftest import free_port

    port = free_port()
    bad = CliRunner().invoke(app, ["serve", "--host", host, "--port", str(port)])
    assert bad.exit_code == 2, bad.output
    assert f"cannot bind {host}:{port}: " in bad.output and "in use" not in bad.output


def test_serve_refuses_bad_settings_and_missing_files_before_starting_anything(
        nothing_starts, tmp_path):
    runner = CliRunner()

    def squeezed(text: str) -> str:  # the error box may break a long path anywhere
        return "".join(text.replace("│", "").split())

    def refused(*args: str) -> str:
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 2, (args, result.output)
        return squeezed(result.output)

    assert "--num-cpus" in refused("--num-cpus", "0")  # was: silently the default
    assert "--num-cpus" in refused("--num-cpus", "-1")  # was: a traceback from ray.init
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [bundled\n")
    assert squeezed("is not valid YAML") in refused("--config", str(broken))
    assert squeezed("'./no-such-model': no such folder") in refused("--model", "./no-such-model")
    assert squeezed("no such folder") in refused("--model", str(tmp_path / "no-such-model"))
    for field in ("profile", "pool"):
        config = tmp_path / f"{field}.yaml"
        config.write_text(f"{field}: {tmp_path / 'no-such-file'}\n")
        assert squeezed(f"{field} '{tmp_path / 'no-such-file'}': no such file") in refused(
            "--config", str(config))


def test_serve_leaves_a_hub_id_to_the_hub_and_exits_1_on_a_failure_after_start(
        monkeypatch, no_s3d_env):
    from serve_app.local import LocalServeError

    given = []

    def failed_after_start(config, *args):
        given.append(config)
        raise LocalServeError("the application did not deploy: Decoder: OSError", exit_code=1)

    monkeypatch.setattr("serve_app.local.serve_locally", failed_after_start)
    result = CliRunner().invoke(app, ["serve", "--model", "owner/name"])
    assert [c.model for c in given] == ["owner/name"]
    assert result.exit_code == 1, result.output  # not 2: no setting was refused
    assert "error: the application did not deploy" in result.output


@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_serve_refuses_a_port_outside_1_to_65535_with_a_usage_error(no_s3d_env, port):
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


def test_train_refuses_too_little_text_with_a_message(tmp_path, monkeypatch):
    from workers import train as train_module

    monkeypatch.setattr(train_module, "corpus_texts", lambda max_chars: ["Only a few words."])
    out = tmp_path / "adapter.safetensors"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--steps", "1",
                                      "--max-chars", "100"])
    assert result.exit_code == 2, result.output  # was a traceback
    assert "too little training text" in words(result.output) and "--max-chars" in result.output
    assert not out.exists()
