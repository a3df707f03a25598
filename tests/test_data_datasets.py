"""Datasets, layouts, transforms and audio of av2ts_cli/data: every subset read back from what synth wrote."""

from __future__ import annotations

import os
import pickle
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from av2ts_cli.data import AVSDataset, build_dataset, collate_clips, list_videos, resolve_root
from av2ts_cli.data.audio import (
    LogMelCache,
    load_wave_16k,
    read_log_mel_pickle,
    read_wav,
    write_log_mel_pickle,
)
from av2ts_cli.data.classes import AVSS_CLASSES, avss_palette
from av2ts_cli.data.images import read_mask, rgb_to_index
from av2ts_cli.data.scene import CATEGORIES, Scene, sample_times
from av2ts_cli.data.synth import SPLIT_CODES, SUBSET_CODES
from av2ts_cli.data.transforms import (
    ClipArrays,
    eval_transform,
    resize_images,
    shortest_edge_size,
    train_transform,
    uncrop_centre,
)
from av2ts_cli.errors import DataError, UsageError

SIZE = 64  # conftest.SYNTH_SIZE


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------------ layout
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


def test_avss_metadata_by_name_or_by_position(synth_data, tmp_path):
    root = shutil.copytree(synth_data / "AVSBench_semantic", tmp_path / "avss")
    before = list_videos(root, "avss", "test")
    csv = root / "metadata.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(["a,b,c,d,e,f,g", *lines[1:]]) + "\n")  # no names: COMBO's positions 1, 5, 6
    assert list_videos(root, "avss", "test") == before
    assert [v.group for v in before] == ["v1s", "v1m", "v2"] and [v.num_frames for v in before] == [5, 5, 10]


# ----------------------------------------------------------------------------------------------------- datasets
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


# ---------------------------------------------------------------------------------------------------- transforms
def test_shortest_edge_follows_detectron2():
    assert shortest_edge_size(224, 224, 112, 896) == (112, 112)
    assert shortest_edge_size(240, 360, 224, 896) == (224, 336)
    assert shortest_edge_size(100, 1000, 224, 896) == (90, 896)  # the long side capped


def test_one_transform_per_clip_keeps_frames_labels_and_maskiges_aligned():
    frame = np.full((48, 48, 3), 120, np.uint8)
    frame[10:30, 5:25] = (230, 30, 30)  # a red square, off-centre (a flip moves it)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 5:25] = 1
    clip = ClipArrays(np.stack([frame] * 3), np.stack([mask] * 3), np.stack([frame] * 3))
    sizes, flips = set(), set()
    for seed in range(24):
        out = train_transform(clip, 32, np.random.default_rng(seed))
        assert out.frames.shape == (3, 32, 32, 3) and out.masks.shape == (3, 32, 32)
        assert (out.frames == out.frames[0]).all() and (out.masks == out.masks[0]).all()  # the same for all frames
        assert np.array_equal(out.maskiges, out.frames)  # and for the maskiges
        assert set(np.unique(out.masks)) <= {0, 1, 255}
        pad = out.masks[0] == 255
        assert (out.frames[0][pad] == 128).all()  # padding: image 128, label 255
        red = out.masks[0] == 1
        if red.any():
            pixels = out.frames[0][red].astype(int)
            assert (pixels[:, 0] > pixels[:, 2] + 40).mean() > 0.9  # the label still covers the red square
        sizes.add(int(pad.sum()))
        flips.add(bool(red[:, 16:].sum() > red[:, :16].sum()) if red.any() else None)
    assert len(sizes) > 3 and {True, False} <= flips  # random resizes (some padded) and both flip states


def test_avss_training_maskiges_cover_the_centre_crop():
    """A 224-style maskige of the centre crop, put back into a wide frame, comes out of the AVSS training crop
    where the crop's pixels are."""
    maskige = np.zeros((1, 32, 32, 3), np.uint8)
    maskige[0, :, :16] = 200  # left half bright
    placed = uncrop_centre(maskige, 48, 96)
    assert placed.shape == (1, 48, 96, 3) and (placed[:, :, :24] == 128).all() and (placed[:, :, 72:] == 128).all()
    frames = np.zeros((1, 48, 96, 3), np.uint8)
    out = train_transform(ClipArrays(frames, np.zeros((1, 48, 96), np.uint8), placed), 32, None,
                          random_resize=False)
    assert (out.maskiges[0, :, :15] == 200).all() and (out.maskiges[0, :, 17:] == 0).all()


def test_eval_transform_resizes_frames_only():
    clip = ClipArrays(np.zeros((2, 60, 80, 3), np.uint8), np.ones((2, 60, 80), np.uint8))
    out = eval_transform(clip, 64)
    assert out.frames.shape == (2, 64, 64, 3) and out.masks.shape == (2, 60, 80)
    assert eval_transform(clip, 64, (224, 224)).masks.shape == (2, 224, 224)
    labels = np.random.default_rng(0).integers(0, 5, size=(3, 20, 20)).astype(np.uint8)
    assert set(np.unique(resize_images(labels, 37, 37, nearest=True))) <= set(range(5))


def test_palette_and_rgb_labels():
    palette = avss_palette()
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[40].tolist() == [64, 0, 64] and palette[70].tolist() == [32, 128, 128]
    assert len({tuple(c) for c in palette}) == 71
    rgb = np.array([[palette[3], palette[70], [1, 2, 3]]], np.uint8)
    assert rgb_to_index(rgb, palette).tolist() == [[3, 70, 0]]  # unknown colours are background


def test_binary_masks_accept_0_255_and_0_1(tmp_path):
    from av2ts_cli.data.images import write_png

    write_png(tmp_path / "a.png", np.array([[0, 255, 200, 100]], np.uint8))
    write_png(tmp_path / "b.png", np.array([[0, 1, 1, 0]], np.uint8))
    assert read_mask(tmp_path / "a.png", "binary").tolist() == [[0, 1, 1, 0]]
    assert read_mask(tmp_path / "b.png", "binary").tolist() == [[0, 1, 1, 0]]


# --------------------------------------------------------------------------------------------------------- audio
def write_pcm(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """samples: [S] or [S, C] integers of ``width`` bytes."""
    samples = samples.reshape(len(samples), -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 3:
            data = samples.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            data = samples.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes()
        w.writeframes(data)
    return path


def test_wav_reading_scales_like_vggish(tmp_path):
    stereo = np.array([[16384, 0], [-32768, -32768], [100, 300]])
    wave_, rate = read_wav(write_pcm(tmp_path / "s.wav", stereo, 16000))
    assert rate == 16000 and wave_.tolist() == pytest.approx([0.25, -1.0, 200 / 32768])  # int16 / 32768, mean
    assert read_wav(write_pcm(tmp_path / "u8.wav", np.array([128, 255, 0]), 16000, 1))[0].tolist() == \
        pytest.approx([0, 127 / 128, -1])
    assert read_wav(write_pcm(tmp_path / "i24.wav", np.array([-(1 << 23), 1 << 22]), 16000, 3))[0].tolist() == \
        pytest.approx([-1, 0.5])


def test_truncated_and_foreign_wavs_are_errors(tmp_path):
    good = write_pcm(tmp_path / "good.wav", np.zeros(1000), 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(DataError, match="cut.wav: truncated WAV"):
        read_wav(cut)
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    with pytest.raises(DataError, match="text.wav: not a WAV"):
        read_wav(text)
    with pytest.raises(DataError, match="missing audio file"):
        read_wav(tmp_path / "none.wav")


def test_other_sample_rates_are_resampled_with_one_warning_per_file(tmp_path, capsys):
    t = np.arange(48000) / 48000
    path = write_pcm(tmp_path / "48k.wav", np.round(8000 * np.sin(2 * np.pi * 1000 * t)), 48000)
    first = load_wave_16k(path)
    second = load_wave_16k(path)
    assert first.shape == (16000,) and torch.equal(first, second)
    spectrum = torch.fft.rfft(first).abs()
    assert int(spectrum.argmax()) == 1000  # 1 kHz survives: 1 Hz per bin for 1 s at 16 kHz
    err = capsys.readouterr().err
    assert err.count("resampled to 16000 Hz") == 1 and "48k.wav" in err


def test_log_mel_cache_on_disk_is_keyed_by_size_and_mtime(tmp_path):
    t = np.arange(32000) / 16000
    path = write_pcm(tmp_path / "a.wav", np.round(8000 * np.sin(2 * np.pi * 440 * t)), 16000)
    cache = LogMelCache(tmp_path / "cache")
    first = cache.examples(path)
    assert first.shape == (2, 96, 64) and len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert torch.equal(LogMelCache(tmp_path / "cache").examples(path), first)  # read back from disk
    write_pcm(path, np.round(8000 * np.sin(2 * np.pi * 2000 * t)), 16000)
    os.utime(path, ns=(1, 1))
    assert not torch.equal(LogMelCache(tmp_path / "cache").examples(path), first)
    assert not list((tmp_path / "cache").rglob("*.partial*"))


def test_log_mel_pickles_round_trip_and_official_style_pickles_load(tmp_path):
    examples = torch.randn(5, 96, 64)
    write_log_mel_pickle(tmp_path / "ours.pkl", examples)
    assert torch.equal(read_log_mel_pickle(tmp_path / "ours.pkl"), examples)
    with open(tmp_path / "official.pkl", "wb") as f:  # what AVSBench did: pickle.dump of a grad-tracking tensor
        pickle.dump(examples.unsqueeze(1).requires_grad_(True), f)
    assert torch.equal(read_log_mel_pickle(tmp_path / "official.pkl"), examples)
    torch.save(examples.unsqueeze(1), tmp_path / "saved.pkl")
    assert torch.equal(read_log_mel_pickle(tmp_path / "saved.pkl"), examples)
    with open(tmp_path / "numpy.pkl", "wb") as f:
        pickle.dump(examples.unsqueeze(1).numpy(), f)
    assert torch.equal(read_log_mel_pickle(tmp_path / "numpy.pkl"), examples)
    torch.save(torch.zeros(3, 4), tmp_path / "shape.pkl")
    with pytest.raises(DataError, match=r"shape.pkl: log-mel of shape \[3, 4\]"):
        read_log_mel_pickle(tmp_path / "shape.pkl")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(DataError, match=r"evil.pkl: refusing to unpickle the global (posix|os)\.system"):
        read_log_mel_pickle(evil)
    assert not marker.exists()
    nested = tmp_path / "nested.pkl"  # deeper inside a container
    nested.write_bytes(pickle.dumps({"log_mel": [torch.zeros(1), _Exploit(marker)]}))
    with pytest.raises(DataError, match="nested.pkl: refusing"):
        read_log_mel_pickle(nested)
    archive = tmp_path / "archive.pkl"  # a torch.save zip goes through torch's weights-only loader
    torch.save({"log_mel": _Exploit(marker)}, archive)
    with pytest.raises(DataError, match="archive.pkl: refused"):
        read_log_mel_pickle(archive)
    assert not marker.exists()
