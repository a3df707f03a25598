"""av2ts_cli/maskiges/sources.py: where COMBO's step-1 masks of each subset live below --masks-from (and below
COMBO's own output root), and one DataError line naming the file for every kind of bad .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from av2ts_cli.data.layout import list_videos, resolve_root
from av2ts_cli.errors import DataError
from av2ts_cli.maskiges.sources import MaskSource, load_masks


def _first_video(synth_data, subset: str, split: str = "test"):
    root = resolve_root(synth_data, subset)
    return list_videos(root, subset, split)[0]


@pytest.mark.parametrize("combo_root", [False, True])
def test_paths_mirror_the_frame_folders(synth_data, tmp_path, combo_root):
    s4, ms3, avss = (_first_video(synth_data, s) for s in ("s4", "ms3", "avss"))
    prefixes = {"s4": "AVSBench_object/Single-source/s4_data/visual_frames", "ms3":
                "AVSBench_object/Multi-sources/ms3_data/visual_frames", "avss": "AVSBench_semantic"}
    expected = {
        "s4": Path("test", s4.group, s4.name, f"{s4.name}_2_mask.npy"),
        "ms3": Path(ms3.name, f"{ms3.name}.mp4_2_mask.npy"),  # MS3 frame names keep ".mp4"
        "avss": Path(avss.group, avss.name, "frames", "1_mask.npy"),
    }
    for subset, video in (("s4", s4), ("ms3", ms3), ("avss", avss)):
        folder = tmp_path / subset
        base = folder / prefixes[subset] if combo_root else folder
        base.mkdir(parents=True)
        assert MaskSource(folder, subset).path(video, 1) == base / expected[subset]


def test_avss_masks_of_the_processed_frames_are_found_too(synth_data, tmp_path):
    video = _first_video(synth_data, "avss")
    processed = tmp_path / video.group / video.name / "processed_frames" / "0_mask.npy"
    processed.parent.mkdir(parents=True)
    np.save(processed, np.ones((2, 224, 224), bool))
    source = MaskSource(tmp_path, "avss")
    assert source.path(video, 0) == processed
    assert source.load(video, 0, frame_size=(64, 64)).shape == (2, 224, 224)  # checked against 224 x 224


def test_good_arrays_load_as_bool(tmp_path):
    for i, array in enumerate([np.ones((2, 5, 7), bool), np.eye(5, 7, dtype=np.uint8)[None],
                               np.zeros((1, 5, 7), np.float64), np.zeros((0, 5, 7), bool)]):
        path = tmp_path / f"{i}_mask.npy"
        np.save(path, array)
        masks = load_masks(path, frame_size=(7, 5))
        assert masks.dtype == bool and masks.shape == array.shape
        assert (masks == array.astype(bool)).all()


@pytest.mark.parametrize("case, reason", [
    ("missing", "missing mask file"),
    ("corrupt", "not a .npy file"),
    ("truncated", "not a valid .npy array"),
    ("objects", "Python objects"),
    ("two_dims", "shape (N, H, W)"),
    ("values", "found the value 7"),
    ("size", "masks are 8x5, the frame is 7x5"),
])
def test_bad_mask_files_are_one_line_naming_the_file(tmp_path, case, reason):
    path = tmp_path / "x_1_mask.npy"
    if case == "corrupt":
        path.write_bytes(b"not an array at all")
    elif case == "truncated":
        np.save(path, np.ones((3, 50, 50), bool))
        path.write_bytes(path.read_bytes()[:200])
    elif case == "objects":
        np.save(path, np.array([{"segmentation": 1}], dtype=object), allow_pickle=True)
    elif case == "two_dims":
        np.save(path, np.ones((5, 7), bool))
    elif case == "values":
        np.save(path, np.full((1, 5, 7), 7, np.uint8))
    elif case == "size":
        np.save(path, np.ones((1, 5, 8), bool))
    with pytest.raises(DataError) as caught:
        load_masks(path, frame_size=(7, 5))
    message = caught.value.message
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_a_missing_masks_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such masks folder"):
        MaskSource(tmp_path / "nowhere", "s4")
