"""``av2ts bench media`` end to end on small clips (the 1080p targets are checked by running the bench itself)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from av2ts_cli import cli


def test_bench_media_quick_json():
    result = CliRunner().invoke(cli.app, ["bench", "media", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [clip["seconds"] for clip in report["clips"]] == [2, 6]
    assert [clip["sampled_frames"] for clip in report["clips"]] == [2, 6]  # one frame per second
    for clip in report["clips"]:
        assert clip["peak_rss_python_mb"] > 10 and clip["peak_rss_ffmpeg_mb"] > 5
        assert clip["baseline_decode_s"] > 0 and clip["ratio_to_baseline"] > 0
    peaks = [clip["peak_rss_mb"] for clip in report["clips"]]
    assert report["rss_ratio"] == round(peaks[1] / peaks[0], 3) and report["rss_target"] == 1.3
    assert report["encode"]["frames"] == 20 and report["encode"]["frames_per_s"] > 0
