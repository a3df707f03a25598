"""`av2ts data check` (av2ts_cli/data/check.py): clean trees pass, every kind of broken file is listed, exit 1."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _layout_384 import write_384_layout
from PIL import Image
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


def _listing(root) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under root: a check must leave the tree as it was."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_malformed_csv_line_and_unknown_split_is_listed_in_one_run(synth_data, tmp_path):
    """Four bad lines of the S4 CSV (short, empty name, two unknown splits) and a blank line: each listed by its line
    in the file, and the videos of the good lines still checked (a missing frame among them found too)."""
    root = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "Single-source")
    csv = root / "s4_meta_data.csv"
    header, *lines = csv.read_text().splitlines()
    test = list_videos(root, "s4", "test")
    test[1].frames[0].unlink()
    # line 1 header, 2-9 the videos; then: a blank line 10, and the bad lines 11-14
    csv.write_text("\n".join([header, *lines, "", "onlyname,0", ",0,playing_tabla,test", "x1,0,playing_tabla,Test",
                              "x2,0,playing_tabla,validation"]) + "\n")
    before = _listing(root)

    result = invoke(["data", "check", "--subset", "s4", "--data", str(root), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [p["problem"] for p in report["problems"] if p["path"] == str(csv)] == [
        "line 11: 2 columns, expected at least 4",
        "line 12: empty video name",
        "line 13: unknown split 'Test' (expected train, val, test)",
        "line 14: unknown split 'validation' (expected train, val, test)",
    ]
    assert {p["path"]: p["problem"] for p in report["problems"]}[str(test[1].frames[0])].startswith("missing")
    assert len(report["problems"]) == 5
    assert report["splits"]["test"]["videos"] == 3 and report["splits"]["test"]["frames"] == 14
    assert _listing(root) == before  # nothing written, nothing touched

    table = invoke(["data", "check", "--subset", "s4", "--data", str(root)])
    assert table.exit_code == 1 and "5 problem(s)" in table.output
    assert "line 11: 2 columns" in table.output and "line 14: unknown split 'validation'" in table.output


def test_avss_unknown_label_sets_and_a_csv_of_only_bad_lines(synth_data, tmp_path):
    root = shutil.copytree(synth_data / "AVSBench_semantic", tmp_path / "AVSBench_semantic")
    csv = root / "metadata.csv"
    header, first, second, *rest = csv.read_text().splitlines()
    cells = second.split(",")
    cells[6] = "v3"
    csv.write_text("\n".join([header, first, ",".join(cells), *rest]) + "\n")
    report = json.loads(invoke(["data", "check", "--subset", "avss", "--data", str(root), "--json"]).stdout)
    assert report["problems"] == [{"path": str(csv), "problem": f"line 3: video {cells[1]}: unknown label 'v3' "
                                                                "(expected one of v1s, v1m, v2)"}]

    csv.write_text(header + "\nonly,two\n")  # no good line: the bad line, and no videos in any split
    result = invoke(["data", "check", "--subset", "avss", "--data", str(root), "--json"])
    assert result.exit_code == 1
    problems = [p["problem"] for p in json.loads(result.stdout)["problems"]]
    assert problems == ["line 2: 2 columns, expected at least 7", "no videos in any split"]


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_the_384_layout_of_a_tree_without_it_is_the_standard_files(synth_data, subset):
    """``--layout 384`` where no 384 folder exists: VCT's dataset reads the standard files, and they pass."""
    result = invoke(["data", "check", "--subset", subset, "--data", str(synth_data), "--layout", "384", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["problems"] == [] and report["layout"] == "384" and report["size_384"] is None


def test_vcts_384_layout_is_checked_by_its_own_size_rules(synth_data, tmp_path):
    """S4 with VCT's folders: 384 px frames and maskiges (one size across the dataset), 384 px training labels
    (their frame's size), 224 px evaluation labels (one size within a video, not their frame's); a file of another
    size in each place is a problem, named once; the standard check does not look at these folders."""
    root = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "Single-source")
    write_384_layout(root, "s4")
    checked = invoke(["data", "check", "--subset", "s4", "--data", str(root), "--layout", "384", "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["problems"] == [] and report["size_384"] == [384, 384] and report["frame_size"] is None
    assert report["splits"]["val"]["masks"] == 10 and report["splits"]["train"]["maskiges"] == 15

    data = root / "s4_data_384"
    frame = next((data / "visual_frames_384" / "train").rglob("*_2.png"))
    maskige = next((data / "pre_SAM_mask_384" / "test").rglob("*_3_mask_color.png"))
    train_label = next((data / "gt_masks_384" / "train").rglob("*.png"))
    eval_label = next((data / "gt_masks_224" / "val").rglob("*_4.png"))
    for path, side in ((frame, 300), (maskige, 200), (train_label, 224), (eval_label, 384)):
        Image.open(path).resize((side, side)).save(path)
    broken = invoke(["data", "check", "--subset", "s4", "--data", str(root), "--layout", "384", "--json"])
    assert broken.exit_code == 1
    problems = {item["path"]: item["problem"] for item in json.loads(broken.stdout)["problems"]}
    assert problems[str(frame)] == "mis-sized: 300x300, the dataset's files of the 384 layout are 384x384"
    assert problems[str(maskige)] == "mis-sized: 200x200, the dataset's files of the 384 layout are 384x384"
    assert problems[str(train_label)].startswith("mis-sized: 224x224, its frame is")
    assert problems[str(eval_label)] == "mis-sized: 384x384, the video's first label is 224x224"
    assert len(problems) == 4, problems
    standard = invoke(["data", "check", "--subset", "s4", "--data", str(root), "--json"])
    assert standard.exit_code == 0 and json.loads(standard.stdout)["problems"] == []
    refused = invoke(["data", "check", "--subset", "s4", "--data", str(root), "--layout", "512"])
    assert refused.exit_code == 2 and "--layout 512: choose from standard, 384" in refused.output
