"""av2ts_cli/maskiges/video.py through ``av2ts maskiges clip.mp4 --out DIR``: one maskige per frame predict
samples, numbered as predict numbers its masks and read by predict's maskige reader; a re-run reuses them and an
--fps change remakes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny_sam import save_tiny_sam
from PIL import Image

from av2ts_cli import media
from av2ts_cli.predict.stream import maskige_reader
from av2ts_cli.runs import MASKIGES_RECORD
from av2ts_cli.sampling import video_schedule

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "av2ts_cli", "maskiges", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_video_maskiges_are_what_predict_reads(tmp_path, make_clip):
    clip = make_clip("talk", duration=2.6, size=(80, 48), pattern="testsrc")
    model = save_tiny_sam(tmp_path / "tiny")
    out = tmp_path / "maskiges"
    common = ["--out", str(out), "--generator", str(model), "--points-per-side", "4", "--pred-iou-thresh", "0",
              "--stability-thresh", "0", "--device", "cpu", "--json"]
    first = _cli(str(clip), "--fps", "2", *common)
    assert first.returncode == 0, first.stderr
    schedule = video_schedule(media.probe(clip), 2, 1)
    folder = out / "talk"  # predict's folder name for the clip
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{f.index:06d}.png" for f in schedule.frames]
    assert len(schedule.frames) == 6  # 3 sampled seconds x 2 passes
    read = maskige_reader(folder, 64)
    for frame in schedule.frames:
        assert read(frame).shape == (64, 64, 3)
    record = json.loads((folder / MASKIGES_RECORD).read_text())
    assert record["complete"] and record["fps"] == 2 and record["times"] == [f.time for f in schedule.frames]
    assert record["model_type"] == "sam" and record["generator"] == str(model)
    assert json.loads(first.stdout)["videos"][0]["written"] == 6

    again = _cli(str(clip), "--fps", "2", *common)
    assert again.returncode == 0 and json.loads(again.stdout)["videos"][0]["skipped"] == 6

    coarser = _cli(str(clip), "--fps", "1", *common)
    assert coarser.returncode == 0 and json.loads(coarser.stdout)["videos"][0]["written"] == 3
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]


def test_a_bad_video_is_reported_and_the_others_done(tmp_path, make_clip):
    clip = make_clip("ok", duration=1.0, size=(64, 48))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    out = tmp_path / "maskiges"
    result = _cli(str(broken), str(clip), "--out", str(out), "--generator", str(save_tiny_sam(tmp_path / "tiny")),
                  "--points-per-side", "2", "--device", "cpu")
    assert result.returncode == 3, result.stderr
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 1 and failures[0].startswith(f"failed: {broken}") and "Traceback" not in result.stderr
    assert (out / "ok" / "000000.png").is_file()
    assert np.asarray(Image.open(out / "ok" / "000000.png")).shape == (224, 224)


def test_a_video_another_run_holds_is_left_to_it(tmp_path, make_clip):
    from av2ts_cli import files, locks
    from av2ts_cli.maskiges import video
    from av2ts_cli.maskiges.generate import GeneratorSettings

    held, free = make_clip("held", duration=1.0, size=(64, 48)), make_clip("free", duration=1.0, size=(64, 48))
    out = tmp_path / "maskiges"
    (out / "free").mkdir(parents=True)
    left = files.temp_name_for(out / "free" / "000000.png")  # what a kill -9 left
    left.write_bytes(b"half")
    with locks.held(out / "held", remove_empty_folder=True):  # as another `av2ts maskiges` would hold it
        report = video.run([held, free], out, generator=str(save_tiny_sam(tmp_path / "tiny")),
                           settings=GeneratorSettings(points_per_side=2), device="cpu", progress=False)
    assert report["busy"] == [{"input": str(held), "pid": os.getpid()}] and report["failures"] == []
    assert [Path(v["input"]).name for v in report["videos"]] == ["free.mp4"]
    assert (out / "free" / "000000.png").is_file() and not left.exists()
    assert not (out / "held").exists()  # the holder made it; released, and nothing in it


class _SeeingGenerator:
    """A generator that records the frames it is given, in its batches, and returns one mask: the left half of the
    frame."""

    frames_per_batch = 2

    def __init__(self):
        self.seen: list[tuple[int, ...]] = []
        self.batches: list[int] = []

    def describe(self) -> dict:
        return {"generator": "test", "repo": None, "revision": None, "model_type": "sam", "settings": {}}

    def generate_many(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batches.append(len(images))
        masks = []
        for image in images:
            self.seen.append(image.shape)
            mask = np.zeros((1, *image.shape[:2]), bool)
            mask[0, :, : image.shape[1] // 2] = True
            masks.append(mask)
        return masks


@pytest.mark.parametrize(("geometry", "seen", "size"), [("square-224", (224, 224, 3), 224),
                                                        ("source-224", (48, 80, 3), 224),
                                                        ("source-384", (48, 80, 3), 384)])
def test_the_generator_sees_the_frame_as_the_geometry_says(tmp_path, make_clip, geometry, seen, size):
    """square-224 (COMBO/AV2TS S4 and MS3): the 224 x 224 squash of the frame; source-224 (AVSS) and source-384
    (VCT): the frame at its source size, the maskige resized after; the record says which, and another geometry
    remakes the maskiges."""
    from av2ts_cli.maskiges.video import video_maskiges

    clip = make_clip("geometry", duration=1.0, size=(80, 48))
    generator = _SeeingGenerator()
    folder = tmp_path / "out"
    result = video_maskiges(clip, folder, generator, geometry=geometry)
    assert result["written"] == 1 and generator.seen == [seen]
    assert np.asarray(Image.open(folder / "000000.png")).shape == (size, size)
    record = json.loads((folder / MASKIGES_RECORD).read_text())
    assert record["geometry"]["name"] == geometry and record["complete"]
    assert video_maskiges(clip, folder, generator, geometry=geometry)["skipped"] == 1  # the same: reused
    other = "source-224" if geometry == "square-224" else "square-224"
    assert video_maskiges(clip, folder, generator, geometry=other)["written"] == 1  # another geometry: remade


def test_the_geometry_option_is_checked_before_any_work(tmp_path, make_clip):
    from conftest import invoke_cli

    clip = make_clip("ok", duration=1.0, size=(64, 48))
    bad = invoke_cli(["maskiges", str(clip), "--out", str(tmp_path / "out"), "--geometry", "square-999"], expect=2)
    assert "--geometry square-999: not one of square-224, source-224, source-384" in bad.output
    dataset = invoke_cli(["maskiges", "--subset", "s4", "--data", str(tmp_path), "--geometry", "source-224"],
                         expect=2)  # a dataset's maskiges are its subset's COMBO kind or VCT's (source-384)
    assert "--geometry source-224: a s4 dataset's maskiges are square-224 (COMBO, AV2TS) or source-384" \
        in dataset.output
    assert not (tmp_path / "out").exists()
