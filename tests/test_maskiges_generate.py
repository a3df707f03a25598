"""av2ts_cli/maskiges/generate.py on tiny random SAM and SAM-HQ models (the real transformers code, no mocks):
in process from a save_pretrained folder, end to end as hf://... from a local Hugging Face cache with
HF_HUB_OFFLINE=1, the offline-missing-model error, the missing-package error, and the small-region clean-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny_sam import FAKE_COMMIT, SIDE2, hub_cache_with, save_tiny_edgetam, save_tiny_sam, save_tiny_sam2
from conftest import one_line

from av2ts_cli.data.datasets import AVSDataset
from av2ts_cli.data.synth import SynthOptions, synthesize
from av2ts_cli.errors import Av2tsError, CheckpointError
from av2ts_cli.maskiges.generate import (
    DEFAULT_REPO,
    DEFAULT_REVISION,
    INSTALL_HINT,
    GeneratorSettings,
    MaskGenerator,
    import_transformers,
    remove_small_regions,
)

REPO = Path(__file__).resolve().parents[1]
LOOSE = GeneratorSettings(points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sam")
    return {"sam": save_tiny_sam(root / "sam"), "sam_hq": save_tiny_sam(root / "sam-hq", hq=True),
            "sam2": save_tiny_sam2(root / "sam2"), "edgetam": save_tiny_edgetam(root / "edgetam")}


@pytest.mark.parametrize("kind", ["sam", "sam_hq", "sam2", "edgetam"])
def test_generates_masks_of_the_frame_size(tiny_models, kind):
    image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    generator = MaskGenerator(tiny_models[kind], LOOSE, device="cpu")
    masks = generator.generate(image)
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (48, 80)
    assert len(masks) >= 1 and masks.reshape(len(masks), -1).any(axis=1).all()  # thresholds 0: something passes
    described = generator.describe()
    assert described["model_type"] == kind and described["settings"]["points_per_side"] == 4
    strict = MaskGenerator(tiny_models[kind], GeneratorSettings(points_per_side=4), device="cpu").generate(image)
    assert strict.shape[1:] == (48, 80) and len(strict) <= len(masks)  # COMBO's thresholds keep fewer, maybe none


@pytest.mark.parametrize("kind", ["sam", "sam_hq", "sam2", "edgetam"])
def test_frames_in_one_encoder_batch_get_the_masks_they_get_alone(tiny_models, kind):
    """generate_many: frames of different sizes through the image encoder as one batch, then each frame's prompts:
    each frame's masks are its own generate's."""
    rng = np.random.default_rng(2)
    frames = [(rng.random(shape) * 255).astype(np.uint8) for shape in ((48, 80, 3), (64, 64, 3), (30, 90, 3))]
    generator = MaskGenerator(tiny_models[kind], LOOSE, device="cpu")
    batched = generator.generate_many(frames)
    assert len(batched) == 3
    for frame, masks in zip(frames, batched, strict=True):
        assert masks.shape[1:] == frame.shape[:2] and len(masks) >= 1
        np.testing.assert_array_equal(masks, generator.generate(frame))


def test_frames_per_batch_follows_the_device_and_its_free_memory():
    """One frame at a time on a CPU (batching there is no faster); on CUDA as many as half the free memory holds,
    twice as many in 16-bit precision, never more than the cap and never fewer than one."""
    import torch

    from av2ts_cli.maskiges.generate import ENCODER_BYTES_PER_FRAME, MAX_FRAMES_PER_BATCH, frames_per_batch

    cuda = torch.device("cuda", 0)
    assert frames_per_batch(torch.device("cpu"), "fp32") == 1
    assert frames_per_batch(cuda, "fp32", free_bytes=0) == 1
    assert frames_per_batch(cuda, "fp32", free_bytes=6 * ENCODER_BYTES_PER_FRAME) == 3
    assert frames_per_batch(cuda, "bf16", free_bytes=6 * ENCODER_BYTES_PER_FRAME) == 6
    assert frames_per_batch(cuda, "fp16", free_bytes=100 * ENCODER_BYTES_PER_FRAME) == MAX_FRAMES_PER_BATCH


def test_a_model_that_loads_but_cannot_run_is_one_line_naming_it(tmp_path):
    """A generator folder whose config does not fit its own layers (the neck expects other channels than the
    encoder gives) loads, then fails on the first frame: one line naming the folder, no exception class."""
    folder = save_tiny_edgetam(tmp_path / "broken", channels=(256, 128, 64, 32))
    generator = MaskGenerator(folder, LOOSE, device="cpu")
    with pytest.raises(CheckpointError) as caught:
        generator.generate(np.zeros((48, 80, 3), np.uint8))
    line = caught.value.message
    assert line.startswith(f"{folder}: the model cannot run on a frame: ") and "RuntimeError" not in line, line
    assert "\n" not in line


def test_the_sam2_point_grid_covers_the_squashed_frame(tiny_models):
    """SAM 2's processor squashes the frame to its square input (size height/width, no longest_edge): the grid of
    point prompts is the frame's grid scaled to that square, not the stock pipeline's long-side one."""
    generator = MaskGenerator(tiny_models["sam2"], LOOSE, device="cpu")
    assert generator.target_size == SIDE2
    points, labels = generator._points(np.zeros((48, 80, 3), np.uint8), 2)
    assert points.shape == (1, 4, 1, 2) and labels.shape == (1, 4, 1) and bool((labels == 1).all())
    expected = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    np.testing.assert_allclose(points[0, :, 0].numpy(), np.array(expected) * SIDE2)


def test_a_folder_with_a_whole_processor_saved_loads(tiny_models, tmp_path):
    """transformers 5's save_pretrained of a SamProcessor writes processor_config.json, not
    preprocessor_config.json: such a folder loads, and gives the same masks; one with neither is refused."""
    import shutil

    import transformers

    folder = tmp_path / "whole-processor"
    shutil.copytree(tiny_models["sam"], folder)
    image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    (folder / "preprocessor_config.json").unlink()
    transformers.SamProcessor(image_processor).save_pretrained(folder)
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    image = (np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)
    expected = MaskGenerator(tiny_models["sam"], LOOSE, device="cpu").generate(image)
    np.testing.assert_array_equal(MaskGenerator(folder, LOOSE, device="cpu").generate(image), expected)
    (folder / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json: missing"):
        MaskGenerator(folder, LOOSE, device="cpu")


def _reference_masks(processor, batches, frame, reshaped, s: GeneratorSettings) -> np.ndarray:
    """The processor's own post-processing of decoder batches, as generate.py ran it before: the IoU test, the
    upscaling of the kept masks, ``filter_masks`` (stability, boxes, RLE), ``post_process_for_mask_generation``."""
    import torch

    rles, scores, boxes = [], [], []
    whole = torch.tensor([0.0, 0.0, frame[1], frame[0]])
    for low, iou in batches:
        keep = iou > s.pred_iou_thresh if s.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        if not keep.any():
            continue
        masks = processor.post_process_masks([low[keep][:, None]], [list(frame)], reshaped_input_sizes=[reshaped],
                                             binarize=False)[0]
        batch_rles, batch_scores, batch_boxes = processor.filter_masks(
            masks, iou[keep][:, None], frame, whole, s.pred_iou_thresh, s.stability_score_thresh, s.mask_threshold,
            s.stability_score_offset)
        rles += batch_rles
        scores.append(batch_scores)
        boxes.append(batch_boxes)
    if not rles:
        return np.zeros((0, *frame), dtype=bool)
    masks, _, _, _ = processor.post_process_for_mask_generation(rles, torch.cat(scores), torch.cat(boxes),
                                                                s.box_nms_thresh)
    return np.stack([np.asarray(m, dtype=bool) for m in masks])


@pytest.mark.parametrize(("iou_thresh", "stability_thresh"), [(0.0, 0.0), (0.5, 0.6), (0.2, 0.7)])
def test_the_filtering_keeps_the_processors_masks_in_its_order(iou_thresh, stability_thresh):
    """select_masks + KeptMasks (IoU test before upscaling, vectorised stability and boxes, packed masks) against
    the processor's post-processing on random smooth logits of three decoder batches: the same masks, same order."""
    import torch
    import transformers

    from av2ts_cli.maskiges.generate import KeptMasks, Upscaler, select_masks

    processor = transformers.SamImageProcessor()  # SAM's: pad to 1024, decoder masks of 256
    frame, reshaped = (45, 80), [576, 1024]  # a 16:9 frame, its long side resized to 1024
    g = torch.Generator().manual_seed(7)
    s = GeneratorSettings(points_per_side=4, pred_iou_thresh=iou_thresh, stability_score_thresh=stability_thresh)
    batches = []
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 256), indexing="ij")
    for n in (12, 9, 15):  # blobs of random place, size and sharpness, with smooth noise
        centre, radius = torch.rand(n, 2, 1, 1, generator=g) * 0.6, torch.rand(n, 1, 1, generator=g) * 0.25 + 0.03
        distance = ((xs - centre[:, 0]) ** 2 + (ys - centre[:, 1]) ** 2).sqrt()
        sharpness = torch.rand(n, 1, 1, generator=g) * 60 + 5
        noise = torch.nn.functional.interpolate(torch.randn(n, 1, 8, 8, generator=g), (256, 256), mode="bicubic")
        batches.append(((radius - distance) * sharpness + noise[:, 0], torch.rand(n, generator=g)))
    expected = _reference_masks(processor, batches, frame, reshaped, s)
    upscale = Upscaler(processor, frame, reshaped)
    upscale.chunk = 4  # several chunks per batch
    kept = KeptMasks(frame)
    for low, iou in batches:
        kept.add(*select_masks(low, iou, upscale, s))
    got = kept.after_nms(s.box_nms_thresh)
    assert got.dtype == bool and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert len(got) >= {0.0: 10, 0.5: 3, 0.2: 1}[iou_thresh]  # the comparison has masks to compare


def test_small_holes_and_islands_are_removed():
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 2:12, 2:12] = True
    mask[0, 5, 5] = False  # a 1 px hole
    mask[0, 16:18, 16:18] = True  # a 4 px island
    cleaned = remove_small_regions(mask, min_area=10, nms_thresh=0.7)
    assert cleaned.shape == (1, 20, 20) and cleaned[0, 5, 5] and not cleaned[0, 16:18, 16:18].any()
    assert cleaned[0].sum() == 100
    lone = np.zeros((1, 20, 20), bool)
    lone[0, 0:2, 0:2] = True  # every island small: the largest stays
    assert remove_small_regions(lone, 10, 0.7)[0].sum() == 4
    assert remove_small_regions(mask, 0, 0.7) is mask


def test_the_clean_up_by_lookup_table_is_sams_clean_up():
    """_clean picks components through a lookup table over their labels; the reference (SAM's
    remove_small_regions, np.isin over the listed labels) gives the same masks on speckled random blobs."""
    import cv2

    from av2ts_cli.maskiges.generate import _clean

    def reference(mask, min_area):
        out = mask.copy()
        count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=8)
        small = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] < min_area]
        if small:
            out |= np.isin(labels, small)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(out.astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        if any(area < min_area for area in areas):
            out = np.isin(labels, [i + 1 for i, a in enumerate(areas) if a >= min_area] or [int(np.argmax(areas)) + 1])
        return out

    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[:60, :90]
    for k in range(30):
        blob = (ys - rng.integers(60)) ** 2 + (xs - rng.integers(90)) ** 2 < rng.integers(2, 25) ** 2
        mask = blob ^ (rng.random((60, 90)) < 0.02 * (k % 3))
        np.testing.assert_array_equal(_clean(mask, 10), reference(mask, 10))


def _hf_env(tmp_path: Path) -> dict:
    home = tmp_path / "hf-home"
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "av2ts_cli", "maskiges", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, **env})


@pytest.mark.slow
def test_end_to_end_from_the_hub_cache_offline(tiny_models, tmp_path):
    env = _hf_env(tmp_path)
    hub_cache_with(tiny_models["sam"], Path(env["HF_HUB_CACHE"]), "av2ts-tests/tiny-sam")
    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions("s4", counts={"train": 1, "val": 1, "test": 1}, seed=3, size=64, maskiges=False,
                                  log_mel=False))
    result = _cli("--subset", "s4", "--data", str(root), "--generator", "hf://av2ts-tests/tiny-sam",
                  "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0", "--device", "cpu",
                  env=env)
    assert result.returncode == 0, result.stderr
    assert "15 maskiges written, 0 already there, 0 failed of 15 frames" in result.stderr
    record = json.loads((root / "AVSBench_object/Single-source/s4_data/pre_SAM_mask.json").read_text())
    assert (record["repo"], record["revision"], record["model_type"]) == ("av2ts-tests/tiny-sam", FAKE_COMMIT, "sam")
    assert record["settings"]["points_per_side"] == 4 and record["settings"]["min_region"] == 10
    for split in ("train", "val", "test"):
        dataset = AVSDataset(root, "s4", split, maskiges=True, augment=False)
        for video in dataset.videos:
            maskiges = dataset.read_clip(video).maskiges
            assert maskiges.shape == (5, 64, 64, 3)  # 224 x 224 files fitted to the 64 px frames by the reader
    pinned = _cli("--subset", "s4", "--data", str(root), "--generator", f"hf://av2ts-tests/tiny-sam@{FAKE_COMMIT}",
                  "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0", "--json", env=env)
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["skipped"] == 15  # the same commit and settings: nothing to redo
    other = _cli("--subset", "s4", "--data", str(root), "--generator", "hf://av2ts-tests/tiny-sam", env=env)
    assert other.returncode == 2 and "pred_iou_thresh=0.0" in other.stderr  # other settings: not mixed in


def test_a_model_missing_offline_is_one_line_with_the_prefetch_command(tmp_path):
    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions("ms3", counts={"train": 1, "val": 1, "test": 1}, size=32, maskiges=False,
                                  log_mel=False))
    result = _cli("--subset", "ms3", "--data", str(root), env=_hf_env(tmp_path))
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"error: hf://{DEFAULT_REPO}@{DEFAULT_REVISION}: ")
    assert "HF_HUB_OFFLINE is set" in line
    assert f"hf download {DEFAULT_REPO} --revision {DEFAULT_REVISION}" in line


def test_without_transformers_the_error_gives_the_install_command(monkeypatch, tiny_models):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when not installed
    with pytest.raises(Av2tsError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        import_transformers()
    with pytest.raises(Av2tsError, match="pip install"):
        MaskGenerator(tiny_models["sam"])
