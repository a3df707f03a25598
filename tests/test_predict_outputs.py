"""predict_outputs.py: the writers that consume the mask stream, and the output folders (names, overlays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from av2ts_cli import runs, sampling
from av2ts_cli.errors import UsageError
from av2ts_cli.predict import outputs as predict_outputs
from av2ts_cli.predict.masks import FrameMask, rle_decode
from av2ts_cli.predict.options import PredictOptions


def test_output_folder_names_never_mix_two_inputs(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "clip").mkdir(parents=True)
    (run_dir / "clip" / "summary.json").write_text(json.dumps({"input": "/elsewhere/clip.mp4"}))
    videos = [tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mov", tmp_path / "other.mp4"]
    assert runs.folder_names(videos, run_dir) == ["clip-2", "clip-3", "other"]


def test_overlay_paths():
    folder = Path("/runs/exp/clip")
    assert predict_outputs.overlay_path(None, folder, "clip", batch=False) is None
    assert predict_outputs.overlay_path("", folder, "clip", batch=True) == folder / "overlay.mp4"
    assert predict_outputs.overlay_path("out.mp4", folder, "clip", batch=False) == Path("out.mp4")
    assert predict_outputs.overlay_path("overlays", folder, "clip", batch=True) == Path("overlays/clip.mp4")
    with pytest.raises(UsageError, match="several videos need a folder"):
        predict_outputs.overlay_path("out.mp4", folder, "clip", batch=True)


def test_mask_outputs_write_each_frame_and_commit_only_a_whole_video(tmp_path):
    schedule = sampling.make_schedule(2.0, fps=1, window=5, last_time=1.96)
    classes = np.zeros((3, 4), np.uint8)
    classes[1, 1:3] = 1
    mask = FrameMask(classes, classes.astype(np.float32) * 0.9)
    folder = tmp_path / "video"
    with predict_outputs.MaskOutputs(folder, schedule, ["background", "sounding"], True, (4, 3),
                                     runs.FORMATS) as outputs:
        for frame in schedule.frames:
            outputs.add(frame, mask)
        assert not (folder / "frames.jsonl").exists()  # only temps while writing
    lines = [json.loads(line) for line in (folder / "frames.jsonl").read_text().splitlines()]
    assert [line["mask"] for line in lines] == ["masks/000000.png", "masks/000001.png"]
    assert lines[1]["audio"] == [0.96, 1.935] and lines[1]["window"] == 0  # example 1 of the window at 0 s
    assert lines[1]["sounding_area"] == pytest.approx(2 / 12, abs=1e-6)
    coco = json.loads((folder / "masks.coco.json").read_text())
    assert np.array_equal(rle_decode(coco["annotations"][1]["segmentation"]), classes == 1)
    assert outputs.sounding_frames == 2 and outputs.files == ["frames.jsonl", "masks.coco.json", "preview.jpg"]
    assert (folder / "preview.jpg").is_file()  # fed no decoded frames here: the masks on grey
    assert outputs.track().times == [f.time for f in schedule.frames]

    partial = tmp_path / "partial"  # a stream that stops early: no whole-video file is left
    with pytest.raises(RuntimeError, match="1 of 2 masks were never given"), predict_outputs.MaskOutputs(
            partial, schedule, ["background", "sounding"], True, (4, 3), ("json", "rle")) as outputs:
        outputs.add(schedule.frames[0], mask)
    assert list(partial.iterdir()) == []
    with pytest.raises(ValueError, match="mask 1 given where mask 0 comes next"), predict_outputs.MaskOutputs(
            partial, schedule, ["background", "sounding"], True, (4, 3), ("json",)) as outputs:
        outputs.add(schedule.frames[1], mask)
    with pytest.raises(UsageError, match="add png to --format"):  # the rule's one home: the options, before work
        PredictOptions(overlay="", formats=("json",)).check()
