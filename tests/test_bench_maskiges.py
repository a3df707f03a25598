"""``av2ts bench maskiges`` end to end with a tiny random SAM (tests/_tiny_sam.py) in quick mode: seconds per
frame for 32 and 16 points per side, each against the same model's image-encoder forward in the same run."""

from __future__ import annotations

import json

import pytest
from conftest import invoke_cli, one_line

pytest.importorskip("transformers")  # the av2ts[sam] extra (part of dev)

from _tiny_sam import save_tiny_sam, save_tiny_sam2  # noqa: E402


def test_bench_maskiges_quick_json(tmp_path):
    model = save_tiny_sam(tmp_path / "tiny")
    result = invoke_cli(["bench", "maskiges", "--generator", str(model), "--quick", "--device", "cpu",
                         "--precision", "fp32", "--json"])
    report = json.loads(result.stdout)
    assert report["generator"] == str(model) and report["model_type"] == "sam" and report["frames"] == 1
    assert 0 < report["image_encoder_parameters"] < report["parameters"] < 200_000
    (cpu,) = report["results"]
    assert cpu["device"] == "cpu" and cpu["encoder_s"] > 0 and cpu["precision"] == "fp32"
    assert [case["points_per_side"] for case in cpu["cases"]] == [32, 16]
    for case in cpu["cases"]:
        assert case["seconds_per_frame"] > 0 and case["masks_per_frame"] >= 0 and case["size"] == [320, 180]
        assert case["ratio_to_encoder"] == pytest.approx(case["seconds_per_frame"] / case["encoder_s"])
        assert case["vs_fp32"] is None
    # no comparison of times here: on a tiny model they are milliseconds, below a shared machine's noise (a frame
    # at 16 points once timed 0.35x an encoder forward that it includes)

    table = invoke_cli(["bench", "maskiges", "--generator", str(model), "--quick", "--device", "cpu",
                        "--points-per-side", "4"])
    assert "x encoder" in table.output and "seconds per frame" in table.output


def test_precisions_and_sizes_are_timed_in_one_run(tmp_path):
    """--precision fp32 --precision bf16, two --size values and --keep-all: one result per precision, a case per
    size, and the bf16 cases carry their time over fp32's of the same size and grid."""
    model = save_tiny_sam(tmp_path / "tiny")
    result = invoke_cli(["bench", "maskiges", "--generator", str(model), "--quick", "--device", "cpu",
                         "--precision", "fp32", "--precision", "bf16", "--size", "64x48", "--size", "96x96",
                         "--points-per-side", "4", "--keep-all", "--json"])
    report = json.loads(result.stdout)
    assert report["frame_sizes"] == [[64, 48], [96, 96]]
    assert report["settings"]["pred_iou_thresh"] == 0 and report["settings"]["stability_score_thresh"] == 0
    fp32, bf16 = report["results"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert [case["size"] for case in bf16["cases"]] == [[64, 48], [96, 96]]
    for mine, base in zip(bf16["cases"], fp32["cases"], strict=True):
        assert mine["vs_fp32"] == pytest.approx(mine["seconds_per_frame"] / base["seconds_per_frame"])
        assert mine["masks_per_frame"] > 0  # thresholds 0: masks reach the post-processing
    for bad in (["--size", "64"], ["--size", "8x8"], ["--precision", "fp8"]):
        line = one_line(invoke_cli(["bench", "maskiges", "--generator", str(model), "--quick", *bad],
                                   expect=2).output)
        assert bad[1] in line


def test_a_missing_generator_is_one_line(tmp_path):
    result = invoke_cli(["bench", "maskiges", "--generator", str(tmp_path / "nothing"), "--quick"], expect=1)
    assert "no such generator folder" in one_line(result.output)


def test_bench_maskiges_times_each_generator_in_one_run(tmp_path):
    """Repeated --generator: one report per generator (SAM and SAM 2 here), each with its time per frame, its
    encoder's time and the ratio, from the same process."""
    sam, sam2 = save_tiny_sam(tmp_path / "sam"), save_tiny_sam2(tmp_path / "sam2")
    result = invoke_cli(["bench", "maskiges", "--generator", str(sam), "--generator", str(sam2), "--quick",
                         "--device", "cpu", "--points-per-side", "2", "--precision", "fp32", "--json"])
    reports = json.loads(result.stdout)["generators"]
    assert [(r["generator"], r["model_type"]) for r in reports] == [(str(sam), "sam"), (str(sam2), "sam2")]
    for report in reports:
        (cpu,) = report["results"]
        (case,) = cpu["cases"]
        assert cpu["encoder_s"] > 0 and case["seconds_per_frame"] > 0
        assert case["ratio_to_encoder"] == pytest.approx(case["seconds_per_frame"] / case["encoder_s"])
    from av2ts_cli.bench.maskiges import print_report
    from av2ts_cli.console import console

    with console.capture() as captured:
        print_report({"generators": reports})
    assert captured.get().count("x encoder") == 2 and "sam2" in captured.get()
