"""``av2ts bench train`` end to end on its smoke case (the real figures come from running the bench itself)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from av2ts_cli import cli


def test_bench_train_quick_json():
    result = CliRunner().invoke(cli.app, ["bench", "train", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["warmup"] == 1
    (case,) = report["results"]
    assert (case["preset"], case["batch"], case["input_size"], case["siam"]) == ("av2ts-tiny", 1, 64, False)
    assert len(case["runs_s"]) == 2 and case["step_s"] > 0 and case["iterations_per_s"] == 1 / case["step_s"]
    assert case["peak_rss_mib"] > 100  # torch alone is more than that
    assert case["backend"] and case["baseline"]["backend"] == "torch"  # the baseline forces the PyTorch fallback
    assert case["speedup"] == case["baseline"]["step_s"] / case["step_s"]


def test_bench_train_rejects_bad_options():
    for args in (["--size", "100"], ["--preset", "av2ts-huge"]):
        result = CliRunner().invoke(cli.app, ["bench", "train", *args])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output
