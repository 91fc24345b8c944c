"""The `s3d` command line, run in process on the bundled model."""

from __future__ import annotations

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


def test_search_refuses_unknown_kinds_before_loading_anything(tmp_path):
    from workers.engine import BUNDLED_PROFILE

    def words(output: str) -> str:  # the message without the error box's frame and wrapping
        return " ".join(output.replace("│", " ").split())

    runner = CliRunner()
    out = tmp_path / "profile.json"
    bad = runner.invoke(app, ["search", "--out", str(out), "--kinds", "hybird",
                              "--skip-sets-from", str(BUNDLED_PROFILE)])
    assert bad.exit_code == 2 and "'hybird'" in words(bad.output)
    assert "s3d, hybrid, s3d_skip" in words(bad.output)
    alone = runner.invoke(app, ["search", "--out", str(out), "--kinds", "hybrid"])
    assert alone.exit_code == 2 and "give the profile" in words(alone.output)
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
    assert not any(tmp_path.iterdir())
