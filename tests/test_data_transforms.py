"""Clip transforms (av2ts_cli/data/transforms.py): the training augmentation and the evaluation resize."""

from __future__ import annotations

import numpy as np

from av2ts_cli.data.transforms import (
    ClipArrays,
    eval_transform,
    resize_images,
    shortest_edge_size,
    train_transform,
    uncrop_centre,
)


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
