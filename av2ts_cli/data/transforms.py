"""Clip transforms: the reference training augmentation and the evaluation resize (model.md section 1.1).

Training, S4/MS3 (COMBO/AV2TS mapper): one random resize of the shortest edge (the reference's list of 16 sides,
112..448 for a 224 input, scaled to the model's input size; longest edge at most 4x the input), a random crop of
input x input, SSD-style colour jitter, a horizontal flip with p = 0.5, then padding to input x input (image 128,
label 255 = ignore). Training, AVSS: the offline preprocessing's short side to the input size and centre crop,
then colour jitter and flip (COMBO trains AVSS on pre-cropped frames). One draw per clip: every frame and maskige
of the clip gets the same transform (the reference redraws the colour jitter per frame; we keep the clip
consistent).

Arrays are stacked along the channel axis so that few OpenCV calls resize a whole clip ([H, W, 3T] images,
[H, W, T] labels); no per-pixel Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from av2ts_cli.avsbench import IGNORE_INDEX

RESIZE_FACTORS = tuple(x / 10 for x in range(5, 21))  # reference: short side int(x * 0.1 * 224), x = 5..20
MAX_SIZE_FACTOR = 4  # reference: max size 896 for a 224 input
IMAGE_PAD = 128
LABEL_PAD = IGNORE_INDEX
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


@dataclass
class ClipArrays:
    """One clip as numpy arrays: frames uint8 [T, H, W, 3] RGB; masks uint8 [T, H', W'] class indices, 255 where
    there is no label; maskiges uint8 [T, H, W, 3] or None."""

    frames: np.ndarray
    masks: np.ndarray
    maskiges: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------------ geometry
def resize_images(images: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    """[N, H, W, C] or [N, H, W] uint8 -> the same at (height, width) in one OpenCV call. Images shrink with area
    averaging and grow bilinearly; ``nearest`` keeps labels exact (OpenCV's exact nearest neighbour: the same pixels
    as PIL's, which the official loaders use)."""
    n, h, w = images.shape[:3]
    if (h, w) == (height, width):
        return images
    channels = images.shape[3] if images.ndim == 4 else 1
    stacked = np.ascontiguousarray(np.moveaxis(images.reshape(n, h, w, channels), 0, 2).reshape(h, w, n * channels))
    if nearest:
        interpolation = cv2.INTER_NEAREST_EXACT
    else:
        interpolation = cv2.INTER_AREA if height * width < h * w else cv2.INTER_LINEAR
    out = np.empty((height, width, n * channels), dtype=images.dtype)
    # channels are independent, so any grouping works: OpenCV 5 takes at most 128 per call, and only 4 for area
    # averaging at a non-integer scale
    step = 4 if interpolation == cv2.INTER_AREA else 128
    for start in range(0, n * channels, step):
        part = cv2.resize(np.ascontiguousarray(stacked[..., start:start + step]), (width, height),
                          interpolation=interpolation)
        out[..., start:start + step] = part.reshape(height, width, -1)
    out = np.moveaxis(out.reshape(height, width, n, channels), 2, 0)
    return np.ascontiguousarray(out if images.ndim == 4 else out[..., 0])


def uncrop_centre(images: np.ndarray, height: int, width: int, fill: int = IMAGE_PAD) -> np.ndarray:
    """[N, h, w, C] images of a centre-cropped square -> [N, height, width, C]: resized to the frame's short side and
    put back at the centre, ``fill`` around (COMBO's AVSS training maskiges cover the centre crop only)."""
    side = min(height, width)
    out = np.full((images.shape[0], height, width, *images.shape[3:]), fill, dtype=images.dtype)
    top, left = (height - side) // 2, (width - side) // 2
    out[:, top:top + side, left:left + side] = resize_images(images, side, side)
    return out


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: scale the short side to ``short``, the long side to at most ``max_size``."""
    scale = short / min(h, w)
    new_h, new_w = h * scale, w * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def _resize_clip(clip: ClipArrays, height: int, width: int) -> ClipArrays:
    maskiges = None if clip.maskiges is None else resize_images(clip.maskiges, height, width)
    return ClipArrays(resize_images(clip.frames, height, width), resize_images(clip.masks, height, width, True),
                      maskiges)


def _crop_clip(clip: ClipArrays, top: int, left: int, height: int, width: int) -> ClipArrays:
    window = (slice(None), slice(top, top + height), slice(left, left + width))
    return ClipArrays(clip.frames[window], clip.masks[window],
                      None if clip.maskiges is None else clip.maskiges[window])


def _pad_clip(clip: ClipArrays, size: int) -> ClipArrays:
    """Pad bottom/right to size x size: images with 128, labels with 255 (ignore)."""
    t, h, w = clip.frames.shape[:3]
    if (h, w) == (size, size):
        return clip

    def pad(array: np.ndarray, value: int) -> np.ndarray:
        out = np.full((t, size, size, *array.shape[3:]), value, dtype=array.dtype)
        out[:, :h, :w] = array
        return out

    return ClipArrays(pad(clip.frames, IMAGE_PAD), pad(clip.masks, LABEL_PAD),
                      None if clip.maskiges is None else pad(clip.maskiges, IMAGE_PAD))


# ------------------------------------------------------------------------------------------------------- colour
@dataclass(frozen=True)
class ColourJitter:
    """SSD-style photometric distortion (Mask2Former's ColorAugSSDTransform), parameters drawn once per clip."""

    brightness: float | None  # added to every channel
    contrast: float | None  # multiplied
    saturation: float | None  # multiplies HSV saturation
    hue: int | None  # added to OpenCV hue (0..179, wraps)
    contrast_first: bool

    @classmethod
    def random(cls, rng: np.random.Generator) -> ColourJitter:
        def maybe(value):
            return value if rng.integers(2) else None

        return cls(
            brightness=maybe(float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))),
            contrast=maybe(float(rng.uniform(*CONTRAST_RANGE))),
            saturation=maybe(float(rng.uniform(*SATURATION_RANGE))),
            hue=maybe(int(rng.integers(-HUE_DELTA, HUE_DELTA + 1))),
            contrast_first=bool(rng.integers(2)),
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] uint8 RGB -> the same, distorted."""
        if self.brightness is not None:
            images = _affine(images, 1.0, self.brightness)
        if self.contrast_first and self.contrast is not None:
            images = _affine(images, self.contrast, 0.0)
        if self.saturation is not None or self.hue is not None:
            images = self._hsv(images)
        if not self.contrast_first and self.contrast is not None:
            images = _affine(images, self.contrast, 0.0)
        return images

    def _hsv(self, images: np.ndarray) -> np.ndarray:
        n, h, w, _ = images.shape
        hsv = cv2.cvtColor(np.ascontiguousarray(images.reshape(n * h, w, 3)), cv2.COLOR_RGB2HSV)
        if self.saturation is not None:
            hsv[..., 1] = _affine(hsv[..., 1], self.saturation, 0.0)
        if self.hue is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + self.hue) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).reshape(n, h, w, 3)


def _affine(images: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return np.clip(images.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- pipelines
def train_transform(clip: ClipArrays, size: int, rng: np.random.Generator | None, random_resize: bool = True
                    ) -> ClipArrays:
    """The training augmentation of one clip, output size x size (labels too). ``random_resize``: S4/MS3's random
    short side and random crop; False (AVSS): short side to ``size`` and a centre crop. ``rng`` None: no
    augmentation at all (frames and labels only brought to size x size: a direct resize for S4/MS3, the centre
    crop for AVSS)."""
    t, h, w = clip.frames.shape[:3]
    if clip.masks.shape[1:] != (h, w):  # labels drawn at another size: bring them to the frames first
        clip = ClipArrays(clip.frames, resize_images(clip.masks, h, w, nearest=True), clip.maskiges)
    if clip.maskiges is not None and clip.maskiges.shape[1:3] != (h, w):
        clip = ClipArrays(clip.frames, clip.masks, resize_images(clip.maskiges, h, w))
    if rng is None and random_resize:
        return _resize_clip(clip, size, size)
    if random_resize:
        short = int(RESIZE_FACTORS[rng.integers(len(RESIZE_FACTORS))] * size)
        new_h, new_w = shortest_edge_size(h, w, short, MAX_SIZE_FACTOR * size)
        clip = _resize_clip(clip, new_h, new_w)
        crop_h, crop_w = min(size, new_h), min(size, new_w)
        top, left = int(rng.integers(new_h - crop_h + 1)), int(rng.integers(new_w - crop_w + 1))
    else:
        new_h, new_w = shortest_edge_size(h, w, size, 10**9)
        clip = _resize_clip(clip, new_h, new_w)
        crop_h, crop_w = min(size, new_h), min(size, new_w)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    clip = _crop_clip(clip, top, left, crop_h, crop_w)
    if rng is None:
        return _pad_clip(clip, size)
    jitter = ColourJitter.random(rng)
    frames = jitter(clip.frames)
    maskiges = None if clip.maskiges is None else jitter(clip.maskiges)
    masks = clip.masks
    if rng.integers(2):
        frames, masks = frames[:, :, ::-1], masks[:, :, ::-1]
        maskiges = None if maskiges is None else maskiges[:, :, ::-1]
    return _pad_clip(ClipArrays(np.ascontiguousarray(frames), np.ascontiguousarray(masks),
                                None if maskiges is None else np.ascontiguousarray(maskiges)), size)


def eval_transform(clip: ClipArrays, size: int, label_size: tuple[int, int] | None = None) -> ClipArrays:
    """Frames (and maskiges) resized to size x size when they differ; labels kept at their own size, or resized
    with nearest neighbour to ``label_size`` (h, w) when given (AVSS is scored at 224 x 224)."""
    maskiges = None if clip.maskiges is None else resize_images(clip.maskiges, size, size)
    masks = clip.masks
    if label_size is not None:
        masks = resize_images(masks, *label_size, nearest=True)
    return ClipArrays(resize_images(clip.frames, size, size), masks, maskiges)
