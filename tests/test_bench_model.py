"""``av2ts bench model`` end to end on a small case (the real figures come from running the bench itself)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.bench import model as bench
from av2ts_cli.bench.model import PARTS


def test_bench_model_json_small_case(monkeypatch):
    # the ResNet-50 baseline costs tens of seconds with its warm-up: a fixed stand-in keeps this test about wiring
    monkeypatch.setattr(bench, "baseline_resnet50", lambda frames, repeats, bf16: 0.5)
    args = ["bench", "model", "--preset", "av2ts-tiny", "--size", "64", "--frames", "2", "--repeats", "2", "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["deform_attn_backend"] and report["frames_per_clip"] == 2 and report["precision"] == "fp32"
    assert report["baseline"]["median_s"] == 0.5 and "resnet50" in report["baseline"]["name"]
    (case,) = report["results"]
    assert (case["preset"], case["input_size"], case["frames"], case["siam"]) == ("av2ts-tiny", 64, 2, False)
    assert len(case["runs_s"]) == 2 and case["median_s"] > 0
    assert case["ratio_to_baseline"] == case["median_s"] / report["baseline"]["median_s"]
    assert set(case["parts_s"]) == set(PARTS) - {"head"} and all(t > 0 for t in case["parts_s"].values())
    assert sum(case["parts_s"].values()) <= case["median_s"] * 1.5


def test_bench_model_rejects_bad_options():
    for args in (["--size", "100"], ["--preset", "av2ts-huge"]):
        result = CliRunner().invoke(cli.app, ["bench", "model", *args])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output


def test_bench_model_times_a_combo_model_beside_av2ts_r50(monkeypatch):
    """--model NAME (a preset or checkpoint) gets av2ts-r50 at the same size in the same run; COMBO has no DSTA
    part, and its fusion (bilateral + audio MLP) and VGGish audio are timed."""
    monkeypatch.setattr(bench, "baseline_resnet50", lambda frames, repeats, bf16: 0.5)
    monkeypatch.setattr(bench, "REFERENCE_CASE", ("av2ts-tiny", 224))  # av2ts-r50's stand-in: same wiring, fast
    args = ["bench", "model", "--model", "combo-tiny", "--size", "64", "--frames", "2", "--repeats", "1", "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    reference, combo = json.loads(result.stdout)["results"]
    assert (reference["preset"], reference["family"], reference["input_size"]) == ("av2ts-tiny", "av2ts", 64)
    assert (combo["name"], combo["family"], combo["input_size"]) == ("combo-tiny", "combo", 64)
    assert set(combo["parts_s"]) == set(PARTS) - {"DSTA", "head"} and all(t > 0 for t in combo["parts_s"].values())
    assert set(reference["parts_s"]) == set(PARTS) - {"head"}


def test_bench_model_times_an_avsegformer_model_whole():
    """AVSegFormer's parts are its backbone, VGGish and head (with the audio projection): together they are the
    whole forward, so the shares are not those of the backbone and audio alone."""
    timing = bench.time_model("avsegformer-tiny", 64, frames=2, repeats=1)
    assert timing.family == "avsegformer" and set(timing.parts_s) == {"backbone", "audio", "head"}
    assert all(t > 0 for t in timing.parts_s.values())
    assert sum(timing.parts_s.values()) <= timing.median_s * 1.5


def test_bench_model_levers_one_run():
    """--levers on a small preset: every step of the ladder timed in one run, fp32 eager first, the default path
    marked, gains and ratios computed from the medians, and each step's argmax agreement with fp32."""
    args = ["bench", "model", "--levers", "--preset", "av2ts-tiny", "--size", "64", "--frames", "2", "--repeats", "1",
            "--threads", "2", "--no-demo", "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (case,) = report["levers"]
    steps = [row["step"] for row in case["steps"]]
    assert steps[:6] == ["fp32 eager", "bf16 autocast + channels_last", "bf16 weights", "+ channels_last",
                         "+ BN folded", "+ lean decoder"]
    assert steps[-1] == "+ lean decoder, 1 thread"  # the thread lever: the same model with 1 thread instead of 2
    assert case["default_step"] == ("+ lean decoder" if report["default_precision"] == "bf16" else "fp32 eager")
    rows = case["steps"]
    for previous, row in zip(rows, rows[1:], strict=False):
        assert row["gain"] == pytest.approx(previous["median_s"] / row["median_s"])
        assert row["x_fp32"] == pytest.approx(rows[0]["median_s"] / row["median_s"])
    assert case["ratio"] == pytest.approx(case["fp32_median_s"] / case["default_median_s"])
    assert all(row["argmax_agreement"] >= 0.995 for row in rows) and rows[0]["argmax_agreement"] == 1.0
    assert report["demo"] is None


def test_demo_agreement_of_the_default_path():
    """The bundled demo model (trained weights) on every whole 5 s clip of the demo video: the default path's
    argmax equals fp32's on at least 99.5% of the pixels."""
    demo = bench.demo_agreement()
    assert demo["clips"] == 3 and demo["frames"] == 15
    assert demo["argmax_agreement"] >= 0.995


def test_bench_model_levers_refuses_checkpoints():
    result = CliRunner().invoke(cli.app, ["bench", "model", "--levers", "--model", "weights/x"])
    assert result.exit_code == 2 and "give --preset, not --model" in result.output
