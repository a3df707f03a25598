"""`av2ts data check` (av2ts_cli/data/check.py): clean trees pass, every kind of broken file is listed, exit 1."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.data.images import write_png
from av2ts_cli.data.layout import list_videos

runner = CliRunner()


def invoke(args: list[str]):
    cli._state["debug"] = False
    return runner.invoke(cli.app, args)


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_clean_synthetic_trees_pass(synth_data, subset):
    result = invoke(["data", "check", "--subset", subset, "--data", str(synth_data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["problems"] == []
    counts = report["splits"]
    if subset == "s4":  # train: 3 videos with one mask each; val 2 and test 3 with five
        assert counts["train"] == {"videos": 3, "frames": 15, "masks": 3, "wavs": 3, "maskiges": 15}
        assert counts["test"]["masks"] == 15
    if subset == "avss":  # test holds v1s, v1m and v2: 5 + 5 + 10 frames; train v1s has one label
        assert counts["test"] == {"videos": 3, "frames": 20, "masks": 20, "wavs": 3, "maskiges": 20}
        assert counts["train"]["masks"] == 1 + 5 + 10


def test_broken_tree_lists_every_problem_and_exits_1(synth_data, tmp_path):
    root = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "Single-source")
    val = list_videos(root, "s4", "val")
    test = list_videos(root, "s4", "test")
    val[0].frames[1].unlink()  # missing frame
    truncated = val[0].masks[2]
    truncated.write_bytes(truncated.read_bytes()[:60])  # corrupt PNG
    write_png(test[0].masks[0], np.zeros((32, 32), np.uint8))  # mis-sized mask
    write_png(test[1].frames[3], np.zeros((64, 48, 3), np.uint8))  # mis-sized frame
    wav = test[2].wav
    wav.write_bytes(wav.read_bytes()[:1000])  # truncated WAV
    val[1].wav.unlink()
    val[1].log_mel.unlink()  # no audio at all
    test[0].wav.unlink()  # the pickle remains: a note, not a problem

    result = invoke(["data", "check", "--subset", "s4", "--data", str(root), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    problems = {item["path"]: item["problem"] for item in report["problems"]}
    assert "missing" in problems[str(val[0].frames[1])]
    assert "unreadable" in problems[str(truncated)]
    assert problems[str(test[0].masks[0])] == "mis-sized: 32x32, its frame is 64x64"
    assert problems[str(test[1].frames[3])].startswith("mis-sized: 48x64")
    assert problems[str(wav)].startswith("truncated WAV")
    assert "missing audio file" in problems[str(val[1].wav)]
    assert len(problems) == 6
    assert any(note["path"] == str(test[0].wav) for note in report["notes"])
    assert report["splits"]["val"]["frames"] == 9 and report["splits"]["val"]["masks"] == 9

    table = invoke(["data", "check", "--subset", "s4", "--data", str(root)])
    assert table.exit_code == 1 and "6 problem(s)" in table.output and "truncated WAV" in table.output


def test_missing_metadata_is_a_one_line_error(synth_data, tmp_path):
    root = shutil.copytree(synth_data / "AVSBench_object" / "Multi-sources", tmp_path / "Multi-sources")
    (root / "ms3_meta_data.csv").unlink()
    result = invoke(["data", "check", "--subset", "ms3", "--data", str(root)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {root / 'ms3_meta_data.csv'}: missing metadata CSV"]
