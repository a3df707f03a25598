"""The synthetic data writer (av2ts_cli/data/synth.py): the official layouts, determinism, ``data clip``."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.classes import AVSS_CLASSES, avss_palette
from av2ts_cli.data.audio import read_log_mel_pickle, read_wav
from av2ts_cli.data.scene import sample_times
from av2ts_cli.data.synth import SynthOptions, synthesize
from av2ts_cli.errors import DataError, UsageError
from av2ts_cli.model.audio import waveform_to_examples

runner = CliRunner()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------ layouts
def test_s4_layout_and_csv(tmp_path):
    root = Path(synthesize(tmp_path, SynthOptions("s4", counts={"train": 1, "val": 1, "test": 0}))["root"])
    assert root == tmp_path / "AVSBench_object" / "Single-source"
    rows = list(csv.reader((root / "s4_meta_data.csv").open()))
    assert rows[0] == ["name", "start", "category", "split"] and [r[3] for r in rows[1:]] == ["train", "val"]
    files = set(tree_digest(root))
    for name, _, category, split in rows[1:]:
        key = f"{split}/{category}/{name}"
        for k in range(1, 6):
            assert f"s4_data/visual_frames/{key}/{name}_{k}.png" in files
            assert f"s4_data/pre_SAM_mask/{key}/{name}_{k}_mask_color.png" in files
            assert (f"s4_data/gt_masks/{key}/{name}_{k}.png" in files) == (split != "train" or k == 1)
        assert f"s4_data/audio_wav/{split}/{category}/{name}.wav" in files
        assert f"s4_data/audio_log_mel/{split}/{category}/{name}.pkl" in files
        frame = Image.open(root / f"s4_data/visual_frames/{key}/{name}_1.png")
        mask = Image.open(root / f"s4_data/gt_masks/{key}/{name}_1.png")
        assert frame.mode == "RGB" and frame.size == (224, 224) and mask.mode == "L" and mask.size == (224, 224)
        assert set(np.unique(np.asarray(mask))) == {0, 255}
        wave, rate = read_wav(root / f"s4_data/audio_wav/{split}/{category}/{name}.wav")
        assert rate == 16000 and wave.shape == (80000,)
        log_mel = read_log_mel_pickle(root / f"s4_data/audio_log_mel/{split}/{category}/{name}.pkl")
        assert log_mel.shape == (5, 96, 64)
        assert torch.allclose(log_mel, waveform_to_examples(torch.from_numpy(wave), 5), atol=1e-4)
    assert len(files) == 2 * (5 + 5 + 1 + 1) + (1 + 5) + 1  # frames, maskiges, wav, pkl; masks; the CSV


def test_ms3_layout(tmp_path):
    root = Path(synthesize(tmp_path, SynthOptions("ms3", counts={"train": 0, "val": 0, "test": 1},
                                                  maskiges=False, log_mel=False))["root"])
    (name, split), = list(csv.reader((root / "ms3_meta_data.csv").open()))[1:]
    assert split == "test"
    files = set(tree_digest(root))
    expected = {f"ms3_data/visual_frames/{name}/{name}.mp4_{k}.png" for k in range(1, 6)}
    expected |= {f"ms3_data/gt_masks/test/{name}/{name}_{k}.png" for k in range(1, 6)}
    expected |= {f"ms3_data/audio_wav/test/{name}.wav", "ms3_meta_data.csv"}
    assert files == expected


def test_avss_layout_metadata_and_labels(tmp_path):
    root = Path(synthesize(tmp_path, SynthOptions("avss", counts={"train": 3, "val": 0, "test": 3}, size=64))["root"])
    assert root == tmp_path / "AVSBench_semantic"
    assert list(json.loads((root / "label2idx.json").read_text())) == list(AVSS_CLASSES)
    assert json.loads((root / "label2idx.json").read_text())["background"] == 1
    header, *rows = list(csv.reader((root / "metadata.csv").open()))
    assert header == ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]
    assert [r[6] for r in rows] == ["v1s", "v1m", "v2"] * 2
    palette = avss_palette()
    for vid, uid, s_min, s_sec, a_obj, split, label in rows:
        start = int(s_min) * 60 + int(s_sec)
        length = 10 if label == "v2" else 5
        assert uid == f"{vid}_{start * 1000}_{(start + length) * 1000}"
        folder = root / label / uid
        assert sorted(p.name for p in (folder / "frames").iterdir()) == sorted(f"{i}.jpg" for i in range(length))
        labelled = 1 if (label == "v1s" and split == "train") else length
        assert len(list((folder / "labels_semantic").iterdir())) == labelled
        for i in range(labelled):
            index = np.asarray(Image.open(folder / "labels_semantic" / f"{i}.png"))
            rgb = np.asarray(Image.open(folder / "labels_rgb" / f"{i}.png").convert("RGB"))
            assert np.array_equal(palette[index], rgb)
            assert {AVSS_CLASSES[c] for c in np.unique(index) if c} <= set(a_obj.split())
        assert read_wav(folder / "audio.wav")[0].shape == (length * 16000,)
        maskiges = root / "pre_SAM_mask" / "AVSBench_semantic" / label / uid / "processed_frames"
        assert len(list(maskiges.glob("*_mask_color.png"))) == length


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    counts = {"train": 2, "val": 1, "test": 1}
    digests = []
    for folder, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(tmp_path / folder, SynthOptions("ms3", counts=counts, seed=seed, size=48))
        digests.append(tree_digest(tmp_path / folder))
    assert digests[0] == digests[1]
    assert set(digests[0].values()) != set(digests[2].values())
    # a split does not depend on the other splits' sizes
    synthesize(tmp_path / "d", SynthOptions("ms3", counts={"train": 0, "val": 1, "test": 0}, seed=5, size=48))
    d = tree_digest(tmp_path / "d")
    assert {k: v for k, v in d.items() if "/val/" in k} == {k: v for k, v in digests[0].items() if "/val/" in k}


def test_existing_output_needs_force_and_bad_options_are_usage_errors(tmp_path):
    options = SynthOptions("s4", counts={"train": 1, "val": 0, "test": 0}, size=32, maskiges=False)
    synthesize(tmp_path, options)
    with pytest.raises(DataError, match="already exists"):
        synthesize(tmp_path, options)
    synthesize(tmp_path, options, force=True)
    assert not list(tmp_path.rglob("*.partial"))
    with pytest.raises(UsageError):
        SynthOptions("s4", categories=7)
    with pytest.raises(UsageError):
        SynthOptions("s5")


def test_cli_synth_json(tmp_path):
    cli._state["debug"] = False
    result = runner.invoke(cli.app, ["data", "synth", "--subset", "ms3", "--out", str(tmp_path), "--videos", "2",
                                     "--val", "1", "--test", "0", "--size", "32", "--categories", "3",
                                     "--no-maskiges", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["splits"] == {"train": 2, "val": 1, "test": 0} and report["frames"] == 15
    assert len(report["categories"]) == 3
    assert not (Path(report["root"]) / "ms3_data" / "pre_SAM_mask").exists()


# ------------------------------------------------------------------------------------------------------ one clip
def test_cli_clip_writes_a_video_and_its_known_masks(tmp_path):
    from av2ts_cli import media

    cli._state["debug"] = False
    out = tmp_path / "clip.mp4"
    args = ["data", "clip", str(out), "--kind", "ms3", "--seconds", "3", "--size", "48", "--categories", "3", "--json"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    masks = tmp_path / "clip-masks"
    assert report["masks"] == str(masks) and sorted(p.name for p in masks.glob("*.png")) == [
        "000000.png", "000001.png", "000002.png"]
    info = media.probe(out)
    assert info.has_audio and (info.width, info.height) == (48, 48) and info.duration == pytest.approx(3.0, abs=0.05)
    truth = json.loads((masks / "truth.json").read_text())
    assert truth["times"] == sample_times(3) and len(truth["sounding"]) == 3
    for k, sounding in enumerate(truth["sounding"]):
        values = set(np.unique(np.asarray(Image.open(masks / f"{k:06d}.png"))))
        assert values <= {0, 255} and (255 in values) == bool(sounding)
    again = runner.invoke(cli.app, args)
    assert again.exit_code == 1 and "already exists" in again.output  # nothing is overwritten without --force
    assert runner.invoke(cli.app, [*args, "--force"]).exit_code == 0
    assert not list(tmp_path.glob(".*partial*"))
    bad = runner.invoke(cli.app, ["data", "clip", str(tmp_path / "x.mp4"), "--kind", "avss"])
    assert bad.exit_code == 2 and "--kind" in bad.output


@pytest.mark.slow
def test_a_terminated_synth_says_so_and_leaves_nothing_and_a_killed_ones_temp_is_swept(tmp_path):
    """SIGTERM: one line, exit 143, the temp dataset removed (every command handles the signals alike, cli.py);
    SIGKILL: the temp stays, and the next synth into the root sweeps it under the root's lock."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "av2ts_cli", "data", "synth", "--subset", "s4", "--out", str(tmp_path / "d"),
               "--videos", "40", "--size", "64"]

    def started() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not any(".partial" in p.name for p in (tmp_path / "d" / "AVSBench_object").glob(".*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        return process

    process = started()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert [line for line in err.splitlines() if line.strip()][-1] == \
        "error: SIGTERM: stopped; what it was writing was removed"
    assert sorted(p.name for p in (tmp_path / "d" / "AVSBench_object").iterdir()) == []
    process = started()
    process.kill()
    process.communicate(timeout=60)
    left = [p.name for p in (tmp_path / "d" / "AVSBench_object").iterdir()]
    assert any(".partial" in name for name in left)
    synthesize(tmp_path / "d", SynthOptions("s4", counts={"train": 1, "val": 1, "test": 1}, size=32,
                                            maskiges=False))
    assert sorted(p.name for p in (tmp_path / "d" / "AVSBench_object").iterdir()) == ["Single-source"]
