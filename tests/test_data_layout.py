"""Where the official layouts keep their files (av2ts_cli/data/layout.py), read from what synth wrote."""

from __future__ import annotations

import shutil

import pytest
from _layout_384 import write_384_layout

from av2ts_cli.data import list_videos, resolve_root
from av2ts_cli.errors import DataError, UsageError


def test_data_may_be_the_root_or_the_subset_folder(synth_data):
    assert resolve_root(synth_data, "s4") == synth_data / "AVSBench_object" / "Single-source"
    assert resolve_root(synth_data / "AVSBench_object", "ms3") == synth_data / "AVSBench_object" / "Multi-sources"
    assert resolve_root(synth_data / "AVSBench_semantic", "avss") == synth_data / "AVSBench_semantic"
    with pytest.raises(DataError, match="no MS3"):
        resolve_root(synth_data / "AVSBench_semantic", "ms3")
    with pytest.raises(UsageError):
        resolve_root(synth_data, "s5")


def test_metadata_is_read_by_position(synth_data, tmp_path):
    """Header names are free text for S4/MS3: renamed columns change nothing."""
    root = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "s4")
    before = list_videos(root, "s4", "val")
    csv = root / "s4_meta_data.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(["vid,trim,class,set", *lines[1:]]) + "\n")
    assert list_videos(root, "s4", "val") == before
    csv.write_text("name,start\nabc,0\n")
    with pytest.raises(DataError, match="line 2: 2 columns"):
        list_videos(root, "s4", "val")


def test_s4_metadata_with_its_columns_reordered_is_read_by_their_names(synth_data, tmp_path):
    """A header that names split and category is followed, whatever the order (read by position, the split column
    would be a category and every video would vanish from its split)."""
    root = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "s4")
    before = list_videos(root, "s4", "val")
    csv = root / "s4_meta_data.csv"
    header, *rows = [line.split(",") for line in csv.read_text().splitlines()]
    order = [0, 3, 1, 2]  # name, split, start, category
    csv.write_text("\n".join(",".join(["name", "split", "start", "category"] if i == 0 else [row[k] for k in order])
                             for i, row in enumerate([header, *rows])) + "\n")
    assert list_videos(root, "s4", "val") == before and before


def test_avss_metadata_by_name_or_by_position(synth_data, tmp_path):
    root = shutil.copytree(synth_data / "AVSBench_semantic", tmp_path / "avss")
    before = list_videos(root, "avss", "test")
    csv = root / "metadata.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(["a,b,c,d,e,f,g", *lines[1:]]) + "\n")  # no names: COMBO's positions 1, 5, 6
    assert list_videos(root, "avss", "test") == before
    assert [v.group for v in before] == ["v1s", "v1m", "v2"] and [v.num_frames for v in before] == [5, 5, 10]


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_vcts_384_layout_is_read_where_it_exists(synth_data, tmp_path, subset):
    """form "384" (``form_for("vct")``): the standard files while the 384 folders are missing (the dataset derives
    VCT's inputs from them), VCT's own once they exist: frames and labels from <x>_data_384 (MS3's frames without
    the ".mp4" infix), 224 px labels for evaluation, maskiges from pre_SAM_mask_384; the audio stays."""
    from pathlib import Path as P

    from av2ts_cli.data.layout import FORM_384, form_for, maskiges_384

    assert (form_for("vct"), form_for("combo"), form_for("av2ts")) == ("384", "standard", "standard")
    name = "Single-source" if subset == "s4" else "Multi-sources"
    root = shutil.copytree(synth_data / "AVSBench_object" / name, tmp_path / subset)
    standard = {split: list_videos(root, subset, split) for split in ("train", "val")}
    assert {split: list_videos(root, subset, split, form=FORM_384) for split in standard} == standard
    with pytest.raises(UsageError, match="unknown dataset layout 'vct'"):
        list_videos(root, subset, "val", form="vct")
    write_384_layout(root, subset)
    data = root / f"{subset}_data_384"
    for split, videos in standard.items():
        for before, video in zip(videos, list_videos(root, subset, split, form=FORM_384), strict=True):
            key = P(split, video.group, video.name) if subset == "s4" else P(video.name)
            assert video.frames[0] == data / "visual_frames_384" / key / f"{video.name}_1.png"
            assert all(frame.is_file() for frame in video.frames)
            assert video.maskiges == maskiges_384(root, before) and all(m.is_file() for m in video.maskiges)
            labels = "gt_masks_384" if split == "train" else "gt_masks_224"
            assert [m is None for m in video.masks] == [m is None for m in before.masks]
            label_key = key if subset == "s4" else P(split, video.name)
            assert [m for m in video.masks if m is not None] == [
                data / labels / label_key / f"{video.name}_{k + 1}.png" for k, m in enumerate(before.masks)
                if m is not None]
            assert all(m.is_file() for m in video.masks if m is not None)
            assert (video.wav, video.log_mel, video.mask_names) == (before.wav, before.log_mel, before.mask_names)
