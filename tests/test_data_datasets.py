"""The torch datasets (av2ts_cli/data/datasets.py): every subset read back from what synth wrote."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from av2ts_cli.classes import AVSS_CLASSES
from av2ts_cli.data import AVSDataset, build_dataset, collate_clips
from av2ts_cli.data.scene import CATEGORIES, Scene, sample_times
from av2ts_cli.data.synth import SPLIT_CODES, SUBSET_CODES
from av2ts_cli.errors import DataError

SIZE = 64  # conftest.SYNTH_SIZE


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_evaluation_items(synth_data, subset):
    dataset = AVSDataset(synth_data, subset, "test", input_size=32, maskiges=True)
    assert len(dataset) == {"s4": 3, "ms3": 2, "avss": 3}[subset]
    for index, video in enumerate(dataset.videos):
        item = dataset[index]
        t = video.num_frames
        label_size = (224, 224) if subset == "avss" else (SIZE, SIZE)
        assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (t, 3, 32, 32)
        assert item["maskiges"].dtype == torch.uint8 and item["maskiges"].shape == (t, 3, 32, 32)
        assert item["audio"].dtype == torch.float32 and item["audio"].shape == (t, 96, 64)
        assert item["masks"].dtype == torch.int64 and item["masks"].shape == (t, *label_size)
        assert item["supervised"].tolist() == [True] * t
        assert item["video"] == video.name and item["mask_paths"] == list(video.mask_names)
        values = set(item["masks"].unique().tolist())
        if subset == "avss":
            assert values <= {0} | {c.avss_index for c in CATEGORIES}
        else:
            assert values <= {0, 1}
    if subset == "avss":
        assert [dataset[i]["frames"].shape[0] for i in range(3)] == [5, 5, 10]  # all real frames


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_training_items(synth_data, subset):
    dataset = build_dataset(subset, synth_data, "train", input_size=32, seed=0)
    for index, video in enumerate(dataset.videos):
        item = dataset[index]
        assert item["frames"].shape == (5, 3, 32, 32) and item["masks"].shape == (5, 32, 32)
        assert item["audio"].shape == (5, 96, 64)
        first_only = subset == "s4" or video.group == "v1s"
        assert item["supervised"].tolist() == ([True] + [False] * 4 if first_only else [True] * 5)
        for t in range(5):
            if not item["supervised"][t]:
                assert (item["masks"][t] == 255).all()  # no label: ignored everywhere
    again = build_dataset(subset, synth_data, "train", input_size=32, seed=0)
    assert torch.equal(again[0]["frames"], dataset[0]["frames"])  # a function of (seed, epoch, index)
    dataset.set_epoch(1)
    assert not torch.equal(again[0]["frames"], dataset[0]["frames"])


def test_avss_v2_training_clip_is_a_random_window_with_its_audio(synth_data):
    dataset = AVSDataset(synth_data, "avss", "train", input_size=32, seed=1)
    index = [v.group for v in dataset.videos].index("v2")
    full = dataset.read_audio(dataset.videos[index], 10)
    starts = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[index]
        start = int(item["mask_paths"][0].rsplit("/", 1)[1].split(".")[0])
        assert item["mask_paths"] == [f"v2/{dataset.videos[index].name}/{i}.png" for i in range(start, start + 5)]
        assert torch.equal(item["audio"], full[start:start + 5])
        starts.add(start)
    assert len(starts) >= 3 and starts <= set(range(6))


def test_labels_match_the_rendered_scene(synth_data):
    """What the datasets read is what the scene had sounding at the AVSBench sample times."""
    dataset = AVSDataset(synth_data, "ms3", "val", input_size=64)
    for index in range(len(dataset)):
        rng = np.random.default_rng([0, SUBSET_CODES["ms3"], SPLIT_CODES["val"], index])
        rng.integers(64, size=11)  # the writer draws the video id first (no collision in this tiny set)
        scene = Scene.random(rng, "ms3")
        item = dataset[index]
        for k, t in enumerate(sample_times(5)):
            assert torch.equal(item["masks"][k], torch.from_numpy((scene.render(t, SIZE)[1] > 0).astype(np.int64)))


def test_avss_classes_follow_label2idx_and_rgb_equals_semantic(synth_data):
    semantic = AVSDataset(synth_data, "avss", "test", labels="semantic")
    rgb = AVSDataset(synth_data, "avss", "test", labels="rgb")
    assert semantic.class_names == AVSS_CLASSES and semantic.num_classes == 71
    for a, b in zip(semantic.videos, rgb.videos, strict=True):
        assert np.array_equal(semantic.eval_labels(a)[1], rgb.eval_labels(b)[1])


def test_workers_and_collate(synth_data):
    dataset = AVSDataset(synth_data, "s4", "train", input_size=32, seed=0)
    loader = DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_clips)
    batch = next(iter(loader))
    assert batch["frames"].shape == (2, 5, 3, 32, 32) and batch["supervised"].shape == (2, 5)
    assert batch["video"] == [v.name for v in dataset.videos[:2]] and len(batch["mask_paths"][0]) == 5
    assert torch.equal(batch["frames"][0], dataset[0]["frames"])


def test_log_mel_pickles_can_replace_the_wavs(synth_data):
    wav = AVSDataset(synth_data, "s4", "val", input_size=32, audio="wav")
    pkl = AVSDataset(synth_data, "s4", "val", input_size=32, audio="pkl")
    assert torch.allclose(wav[0]["audio"], pkl[0]["audio"], atol=1e-4)


def test_shuffled_audio_comes_from_the_partner(synth_data):
    dataset = AVSDataset(synth_data, "s4", "test", input_size=32, audio_from=[1, 2, 0])
    plain = AVSDataset(synth_data, "s4", "test", input_size=32)
    assert torch.equal(dataset[0]["audio"], plain[1]["audio"]) and torch.equal(dataset[0]["frames"], plain[0]["frames"])


def test_missing_frame_and_corrupt_mask_name_the_file(synth_data, tmp_path):
    root = shutil.copytree(synth_data / "AVSBench_object" / "Multi-sources", tmp_path / "ms3")
    dataset = AVSDataset(root, "ms3", "test", input_size=32)
    video = dataset.videos[0]
    video.frames[2].unlink()
    with pytest.raises(DataError, match=f"{video.frames[2].name}: missing frame"):
        dataset[0]
    video.masks[1].write_bytes(video.masks[1].read_bytes()[:40])
    with pytest.raises(DataError, match=f"{video.masks[1].name}: unreadable mask"):
        dataset.eval_labels(video)


def test_a_vct_dataset_reads_the_384_layout_with_224_labels_and_each_clips_category(synth_data, tmp_path):
    """VCT's S4 evaluation (spec vct.md sections 1 and 11): the 384 px frames of s4_data_384 go in as they are and
    the 224 px labels are scored at their own size; every S4 item carries its clip's category (VCT's PAC term)."""
    import shutil

    from PIL import Image

    from av2ts_cli.config import get_preset
    from av2ts_cli.data.layout import list_videos

    root = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "s4")
    videos = list_videos(root, "s4", "val")
    for video in videos:  # VCT's generate_data_384 output for val, made from the standard files
        for k, (frame, mask) in enumerate(zip(video.frames, video.masks, strict=True), start=1):
            for source, folder, side, rule in ((frame, "visual_frames_384", 384, Image.BILINEAR),
                                               (mask, "gt_masks_224", 224, Image.NEAREST)):
                target = root / "s4_data_384" / folder / "val" / video.group / video.name / f"{video.name}_{k}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.open(source).resize((side, side), rule).save(target)
    cfg = get_preset("vct-tiny", "s4")
    dataset = build_dataset("s4", root, "val", cfg=cfg, input_size=384)
    item = dataset[0]
    assert item["frames"].shape == (5, 3, 384, 384) and item["masks"].shape == (5, 224, 224)
    stored = np.asarray(Image.open(dataset.videos[0].frames[2]).convert("RGB"))
    assert (item["frames"][2].permute(1, 2, 0).numpy() == stored).all()
    assert item["category"] == videos[0].group and item["supervised"].all()
    standard = build_dataset("s4", root, "val", cfg=get_preset("combo-tiny", "s4"))
    assert standard.videos == videos and standard[0]["category"] == videos[0].group
    assert build_dataset("avss", synth_data, "val", input_size=32)[0]["category"] == ""  # S4 only
