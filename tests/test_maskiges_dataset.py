"""av2ts_cli/maskiges/dataset.py through ``av2ts maskiges --subset ... --data ... --masks-from``: the maskiges land
where the dataset reader reads them and equal COMBO's rendering; re-runs skip; the provenance record guards against
mixing sources; bad inputs are one line each and the rest is done; two torchrun processes write each frame once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from av2ts_cli.data.datasets import AVSDataset
from av2ts_cli.data.layout import SPLITS, list_videos, resolve_root
from av2ts_cli.data.synth import SynthOptions, synthesize
from av2ts_cli.maskiges.dataset import PROVENANCE_FILE, maskige_root
from av2ts_cli.maskiges.render import maskige_rgb

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 2, "val": 1, "test": 1}


def _frame_masks(seed: int, h: int, w: int) -> np.ndarray:
    """3 random overlapping rectangles (some frames get none: COMBO's all-zero (1, H, W))."""
    rng = np.random.default_rng(seed)
    if seed % 7 == 0:
        return np.zeros((1, h, w), np.float64)
    masks = np.zeros((3, h, w), np.uint8)
    for k in range(3):
        top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
        masks[k, top:top + rng.integers(4, h - top), left:left + rng.integers(4, w - left)] = 1
    return masks


def _mask_file(masks_dir: Path, subset: str, video, i: int) -> Path:
    """COMBO's step-1 layout, spelled out from the spec (not from sources.py)."""
    frame = video.frames[i]
    if subset == "s4":
        return masks_dir / video.split / video.group / video.name / f"{frame.stem}_mask.npy"
    if subset == "ms3":
        return masks_dir / video.name / f"{frame.stem}_mask.npy"
    return masks_dir / video.group / video.name / "frames" / f"{frame.stem}_mask.npy"


def _dataset_with_masks(tmp_path: Path, subset: str) -> tuple[Path, Path, dict]:
    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions(subset, counts=COUNTS, seed=1, size=224, maskiges=False, log_mel=False))
    masks_dir = tmp_path / "masks"
    expected = {}
    seed = 0
    for split in SPLITS:
        for video in list_videos(resolve_root(root, subset), subset, split):
            for i in range(video.num_frames):
                masks = _frame_masks(seed, 224, 224)
                path = _mask_file(masks_dir, subset, video, i)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, masks)
                expected[video.maskiges[i]] = maskige_rgb(masks.astype(bool), subset, train=split == "train")
                seed += 1
    return root, masks_dir, expected


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "av2ts_cli", "maskiges", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_masks_from_round_trip_through_the_dataset_reader(tmp_path, subset):
    root, masks_dir, expected = _dataset_with_masks(tmp_path, subset)
    result = _cli("--subset", subset, "--data", str(root), "--masks-from", str(masks_dir))
    assert result.returncode == 0, result.stderr
    total = len(expected)
    assert f"{total} maskiges written, 0 already there, 0 failed of {total} frames" in result.stderr
    for split in SPLITS:
        dataset = AVSDataset(root, subset, split, maskiges=True, augment=False)
        for video in dataset.videos:
            read = dataset.read_clip(video).maskiges
            for i in range(video.num_frames):
                assert (read[i] == expected[video.maskiges[i]]).all(), (split, video.name, i)
    subset_root = resolve_root(root, subset)
    record = json.loads((maskige_root(subset_root, subset).parent / PROVENANCE_FILE).read_text())
    assert record["source"] == "masks-from" and record["masks_from"] == str(masks_dir.resolve())

    again = _cli("--subset", subset, "--data", str(root), "--masks-from", str(masks_dir), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["written"], report["skipped"], report["failures"]) == (0, total, [])

    other = tmp_path / "other-masks"
    other.mkdir()
    refused = _cli("--subset", subset, "--data", str(root), "--masks-from", str(other))
    assert refused.returncode == 2
    assert "its maskiges were made by the masks in" in refused.stderr and "--force" in refused.stderr


def test_maskiges_of_unknown_origin_are_not_mixed_in(tmp_path):
    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions("ms3", counts={"train": 1, "val": 1, "test": 1}, seed=2, size=64,
                                  log_mel=False))  # with synth's own maskiges
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    result = _cli("--subset", "ms3", "--data", str(root), "--masks-from", str(masks_dir))
    assert result.returncode == 2 and "15 maskiges of unknown origin" in result.stderr


def test_bad_inputs_are_one_line_each_and_the_rest_is_done(tmp_path):
    root, masks_dir, expected = _dataset_with_masks(tmp_path, "s4")
    video = list_videos(resolve_root(root, "s4"), "s4", "val")[0]
    corrupt, missing = _mask_file(masks_dir, "s4", video, 1), _mask_file(masks_dir, "s4", video, 3)
    corrupt.write_bytes(b"\x93NUMPY garbage")
    missing.unlink()
    wrong = _mask_file(masks_dir, "s4", video, 4)
    np.save(wrong, np.ones((2, 100, 100), bool))  # not the frame's 224 x 224
    unreadable_frame = video.frames[0]
    unreadable_frame.write_bytes(b"not a png")

    result = _cli("--subset", "s4", "--data", str(root), "--masks-from", str(masks_dir))
    assert result.returncode == 3, result.stderr
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 4, result.stderr
    for path in (corrupt, missing, wrong, unreadable_frame):
        assert sum(line.startswith(f"failed: {path}: ") for line in failures) == 1, (path, failures)
    assert "Traceback" not in result.stderr
    bad = {video.maskiges[i] for i in (0, 1, 3, 4)}
    for target, rgb in expected.items():
        if target in bad:
            assert not target.exists()
        else:
            assert (np.asarray(Image.open(target).convert("RGB")) == rgb).all()
    assert not list(maskige_root(resolve_root(root, "s4"), "s4").rglob(".*partial*"))


@pytest.mark.slow
def test_two_torchrun_processes_write_every_frame_once(tmp_path):
    root, masks_dir, expected = _dataset_with_masks(tmp_path, "s4")
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--log-dir",
         str(logs), "--redirects", "1", "-m", "av2ts_cli", "maskiges", "--subset", "s4", "--data", str(root),
         "--masks-from", str(masks_dir), "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(logs.rglob("stdout.log"))]
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world_size"] for r in reports} == {2}
    total = len(expected)
    # each process wrote only its own shard and skipped nothing, and together they wrote every frame: no frame
    # was written by both (that would need a skip or a count above the total)
    assert sum(r["written"] for r in reports) == total and all(r["skipped"] == 0 for r in reports)
    assert sorted(r["frames"] for r in reports) == [total // 2, total - total // 2]
    for target, rgb in expected.items():
        assert (np.asarray(Image.open(target).convert("RGB")) == rgb).all()


def test_vct_maskiges_of_a_dataset_go_to_its_384_layout_and_a_vct_model_reads_them(tmp_path):
    """``--geometry source-384`` with the tiny SAM: each frame's masks (the generator sees the frame as stored) as
    an id map resized to 384 x 384 nearest, at VCT's place (s4_data_384/pre_SAM_mask_384/...), recorded in
    pre_SAM_mask_384.json; COMBO's pre_SAM_mask/ untouched; a VCT model's dataset reads exactly these pictures,
    another family's the standard ones."""
    pytest.importorskip("transformers")
    from _tiny_sam import save_tiny_sam

    from av2ts_cli.config import get_preset
    from av2ts_cli.data.datasets import build_dataset
    from av2ts_cli.data.images import read_rgb
    from av2ts_cli.data.layout import FORM_384, maskiges_384
    from av2ts_cli.maskiges.dataset import PROVENANCE_384, pregenerate, provenance_path
    from av2ts_cli.maskiges.generate import GeneratorSettings, MaskGenerator
    from av2ts_cli.maskiges.render import id_map

    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions("s4", counts={"train": 1, "val": 1, "test": 1}, seed=1, size=96, maskiges=False,
                                  log_mel=False))
    sam = save_tiny_sam(tmp_path / "tiny-sam")
    settings = GeneratorSettings(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    report = pregenerate("s4", root, generator=str(sam), settings=settings, device="cpu", geometry="source-384",
                         progress=False)
    assert (report["written"], report["failures"], report["geometry"]) == (15, [], "source-384")
    subset_root = resolve_root(root, "s4")
    assert report["out"] == str(subset_root / "s4_data_384" / "pre_SAM_mask_384")
    record = json.loads(provenance_path(subset_root, "s4", FORM_384).read_text())
    assert provenance_path(subset_root, "s4", FORM_384).name == PROVENANCE_384
    assert record["geometry"]["name"] == "source-384" and record["settings"]["points_per_side"] == 8
    assert not maskige_root(subset_root, "s4").exists()  # COMBO's kind: not made

    generator = MaskGenerator(str(sam), settings, "cpu")
    cfg = get_preset("vct-tiny", "s4", siam=True)
    for split in SPLITS:
        video = list_videos(subset_root, "s4", split)[0]
        targets = maskiges_384(subset_root, video)
        assert targets[0] == (subset_root / "s4_data_384" / "pre_SAM_mask_384" / split / video.group / video.name
                              / f"{video.name}_1_mask_color.png")
        for i in (0, 4):
            frame = read_rgb(video.frames[i])  # as stored: 96 x 96 here
            expected = Image.fromarray(id_map(generator.generate(frame))).resize((384, 384), Image.NEAREST)
            written = Image.open(targets[i])
            assert written.size == (384, 384) and written.mode == "P"
            assert (np.asarray(written) == np.asarray(expected)).all(), (split, i)
        dataset = build_dataset("s4", root, split, cfg=cfg, input_size=384, train=False)
        assert dataset.form == FORM_384 and dataset.videos[0].maskiges == targets
        item = dataset[0]  # the pictures go in as they are (384: the input of vct-swinb, made 384 here)
        assert (item["maskiges"][0].permute(1, 2, 0).numpy() == np.asarray(Image.open(targets[0]).convert("RGB"))
                ).all()
    combo = build_dataset("s4", root, "val", cfg=get_preset("combo-tiny", "s4", siam=True), train=False)
    assert combo.videos[0].maskiges == list_videos(subset_root, "s4", "val")[0].maskiges  # the standard place

    again = pregenerate("s4", root, generator=str(sam), settings=settings, device="cpu", geometry="source-384",
                        progress=False)
    assert (again["written"], again["skipped"]) == (0, 15)
    refused = _cli("--subset", "s4", "--data", str(root), "--geometry", "source-224")
    assert refused.returncode == 2
    assert "--geometry source-224: a s4 dataset's maskiges are square-224 (COMBO, AV2TS) or source-384" \
        in refused.stderr


def test_frames_go_to_the_generator_in_batches_and_a_bad_frame_fails_alone(tmp_path):
    """A generator that takes 4 frames per encoder batch: every maskige equals the one its frame gets alone, and
    an unreadable frame inside a batch is one failure while the other frames of its batch are written."""
    pytest.importorskip("transformers")
    from _tiny_sam import save_tiny_sam

    from av2ts_cli.data.images import read_rgb
    from av2ts_cli.maskiges.dataset import pregenerate
    from av2ts_cli.maskiges.generate import GeneratorSettings, MaskGenerator

    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions("s4", counts={"train": 1, "val": 1, "test": 0}, seed=2, size=64, maskiges=False,
                                  log_mel=False))
    settings = GeneratorSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    generator = MaskGenerator(str(save_tiny_sam(tmp_path / "tiny-sam")), settings, "cpu")
    generator.frames_per_batch = 4
    subset_root = resolve_root(root, "s4")
    videos = [list_videos(subset_root, "s4", split)[0] for split in ("train", "val")]
    expected = {video.maskiges[i]: maskige_rgb(generator.generate(read_rgb(video.frames[i])), "s4",
                                               train=video.split == "train")
                for video in videos for i in range(video.num_frames)}
    bad = videos[0].frames[2]  # the third frame of the first batch
    bad.write_bytes(b"not a png")

    report = pregenerate("s4", root, generator=generator, settings=settings, device="cpu", progress=False)
    assert report["written"] == len(expected) - 1
    assert [failure["path"] for failure in report["failures"]] == [str(bad)]
    for target, rgb in expected.items():
        if target == videos[0].maskiges[2]:
            assert not target.exists()
        else:
            assert (np.asarray(Image.open(target).convert("RGB")) == rgb).all(), target
