"""Clip transforms (av2ts_cli/data/transforms.py): the training augmentation and the evaluation resize."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from av2ts_cli.data.transforms import (
    ClipArrays,
    ColourJitter,
    avss_crop_geometry,
    eval_transform,
    jitter_clip,
    resize_images,
    shortest_edge_size,
    square_short_side,
    train_transform,
    uncrop_centre,
)


def test_shortest_edge_follows_detectron2():
    assert shortest_edge_size(224, 224, 112, 896) == (112, 112)
    assert shortest_edge_size(240, 360, 224, 896) == (224, 336)
    assert shortest_edge_size(100, 1000, 224, 896) == (90, 896)  # the long side capped


def test_one_geometry_per_clip_keeps_frames_labels_and_maskiges_aligned():
    frame = np.full((48, 48, 3), 120, np.uint8)
    frame[10:30, 5:25] = (230, 30, 30)  # a red square, off-centre (a flip moves it)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 5:25] = 1
    clip = ClipArrays(np.stack([frame] * 3), np.stack([mask] * 3), np.stack([frame] * 3))
    sizes, flips = set(), set()
    for seed in range(24):
        out = train_transform(clip, 32, np.random.default_rng(seed))
        assert out.frames.shape == (3, 32, 32, 3) and out.masks.shape == (3, 32, 32)
        assert (out.masks == out.masks[0]).all()  # the same resize, crop and flip for all frames
        assert set(np.unique(out.masks)) <= {0, 1, 255}
        pad = out.masks[0] == 255
        for images in (out.frames, out.maskiges):  # padding after the jitter: image 128, label 255
            assert (images[:, pad] == 128).all()
        red = out.masks[0] == 1
        if red.any():
            for images in (out.frames, out.maskiges):  # each frame's and maskige's own jitter keeps red red
                pixels = images[:, red].astype(int)
                assert (pixels[..., 0] > pixels[..., 2] + 40).mean() > 0.9  # the label still covers the square
        sizes.add(int(pad.sum()))
        flips.add(bool(red[:, 16:].sum() > red[:, :16].sum()) if red.any() else None)
    assert len(sizes) > 3 and {True, False} <= flips  # random resizes (some padded) and both flip states


def test_colour_jitter_is_drawn_for_every_frame_and_maskige():
    """The reference's ColorAugSSDTransform samples on each call: frame t, then maskige t, each its own draw; one
    seed gives the same clip twice."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    maskiges = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    draws = np.random.default_rng(5)
    jitters = [ColourJitter.random(draws) for _ in range(6)]  # frame 0, maskige 0, frame 1, ...
    assert jitters[0] != jitters[2] and jitters[0] != jitters[1] and jitters[2] != jitters[3]
    out_frames, out_maskiges = jitter_clip(frames, maskiges, np.random.default_rng(5))
    for t in range(3):
        assert np.array_equal(out_frames[t], jitters[2 * t](frames[t:t + 1])[0])
        assert np.array_equal(out_maskiges[t], jitters[2 * t + 1](maskiges[t:t + 1])[0])

    # in the clip transform: the same image in every frame and maskige comes out in several colourings
    flat = np.full((5, 32, 32, 3), (90, 140, 60), np.uint8)
    clip = ClipArrays(flat, np.zeros((5, 32, 32), np.uint8), flat.copy())
    out = train_transform(clip, 32, np.random.default_rng(3), random_resize=False)
    colours = {tuple(image[16, 16]) for image in (*out.frames, *out.maskiges)}
    assert len(colours) >= 5, colours
    again = train_transform(clip, 32, np.random.default_rng(3), random_resize=False)
    assert np.array_equal(again.frames, out.frames) and np.array_equal(again.maskiges, out.maskiges)
    other = train_transform(clip, 32, np.random.default_rng(4), random_resize=False)
    assert not np.array_equal(other.frames, out.frames)


def test_frames_resize_with_pil_bilinear_and_labels_with_nearest():
    """detectron2's ResizeTransform: PIL bilinear for images (antialiased when shrinking, so OpenCV's filters differ),
    nearest for labels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 9, 11, 3), dtype=np.uint8)
    for height, width in ((5, 6), (17, 23), (9, 4)):
        out = resize_images(images, height, width)
        pil = np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR)) for im in images])
        assert out.shape == (2, height, width, 3) and np.array_equal(out, pil)
    shrunk = resize_images(images, 5, 6)
    for interpolation in (cv2.INTER_LINEAR, cv2.INTER_AREA):  # so the test above can tell the filters apart
        assert not np.array_equal(shrunk[0], cv2.resize(images[0], (6, 5), interpolation=interpolation))
    labels = rng.integers(0, 5, (2, 9, 11), dtype=np.uint8)
    out = resize_images(labels, 17, 7, nearest=True)
    pil = np.stack([np.asarray(Image.fromarray(x).resize((7, 17), Image.NEAREST)) for x in labels])
    assert np.array_equal(out, pil)
    grey = resize_images(labels[..., None] * 50, 4, 5)  # one channel: PIL bilinear on the plane
    assert grey.shape == (2, 4, 5, 1)
    assert np.array_equal(grey[0, ..., 0], np.asarray(Image.fromarray(labels[0] * 50).resize((5, 4),
                                                                                             Image.BILINEAR)))


@pytest.mark.parametrize(("h", "w", "expected"), [
    (720, 1280, (224, 398, 0, 87)),  # long side truncated (398.2)
    (224, 399, (224, 399, 0, 88)),  # offset round(87.5) = 88 (half to even)
    (399, 224, (399, 224, 88, 0)),
    (100, 179, (224, 400, 0, 88)),  # 400.96 truncated
])
def test_avss_crop_follows_the_preprocessing(h, w, expected):
    assert avss_crop_geometry(h, w, 224) == expected


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


def test_vcts_avss_training_clip_is_first_squashed_to_its_short_side():
    """VCT's AVSS mapper: frames bilinear (PIL), labels and maskiges nearest, to the square of the short side."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 30, 50, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (2, 30, 50), dtype=np.uint8)
    square = square_short_side(ClipArrays(frames, masks, frames.copy()))
    assert square.frames.shape == (2, 30, 30, 3) and square.masks.shape == (2, 30, 30)
    expected = np.asarray(Image.fromarray(frames[1]).resize((30, 30), Image.BILINEAR))
    assert (square.frames[1] == expected).all()
    assert (square.masks[0] == np.asarray(Image.fromarray(masks[0]).resize((30, 30), Image.NEAREST))).all()
    assert (square.maskiges[0] == np.asarray(Image.fromarray(frames[0]).resize((30, 30), Image.NEAREST))).all()
