"""``av2ts bench predict`` end to end on small clips with the tiny preset (the r50 / 10-minute targets are checked by
running the bench itself; speed is never asserted in a test)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from av2ts_cli import cli


@pytest.mark.slow
def test_bench_predict_quick_json():
    result = CliRunner().invoke(cli.app, ["bench", "predict", "--quick", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    speed = report["speed"]
    assert (speed["preset"], speed["windows"], speed["frames"]) == ("av2ts-tiny", 2, 6)
    assert 0 < speed["model_s"] < speed["predict_s"] and speed["windows_per_s"] > 0
    assert speed["outside_model_share"] == pytest.approx(1 - speed["model_s"] / speed["predict_s"], abs=1e-3)
    assert speed["share_ok"] == (speed["outside_model_share"] <= 0.15) and report["threads"] == 1
    ratio = speed["ms_per_window"] / speed["baseline_resnet50_ms"]
    assert speed["window_vs_baseline"] == pytest.approx(ratio, abs=0.006)  # rounded to 2 decimals
    runs = report["memory"]["runs"]
    assert [(r["seconds"], r["windows"]) for r in runs] == [(5, 1), (20, 4)]
    assert all(r["peak_rss_mb"] > 50 for r in runs)
    assert report["memory"]["rss_ratio"] == pytest.approx(runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], abs=1e-3)
