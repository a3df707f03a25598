"""Clip transforms: the reference training augmentation and the evaluation resize (docs/model.md, 'Frames and
augmentation'; the rules
that follow the reference are listed in docs/model.md, "Training fidelity").

Training, S4/MS3 (COMBO/AV2TS mapper): one random resize of the shortest edge (the reference's list of 16 sides,
112..448 for a 224 input, scaled to the model's input size; longest edge at most 4x the input), a random crop of
input x input, SSD-style colour jitter, a horizontal flip with p = 0.5, then padding to input x input (image 128,
label 255 = ignore). Training, AVSS: the offline preprocessing's short side to the input size and centre crop,
then colour jitter and flip (COMBO trains AVSS on pre-cropped frames). The geometry (resize, crop, flip) is drawn
once per clip and applied to every frame, label and maskige; the colour jitter is drawn anew for every image, each
frame and each maskige its own, as the reference's ``ColorAugSSDTransform`` samples on every call.

Filters: frames are resized with PIL's bilinear filter (detectron2's ``ResizeTransform``, the AVSS
preprocessing), labels with nearest neighbour. Maskiges: nearest neighbour (the AVSS preprocessing), except in the
S4/MS3 random resize, where the reference's mapper resizes them as images (bilinear).

Labels are stacked along the channel axis so that one OpenCV call resizes a whole clip ([H, W, T]); frames go
through PIL one image at a time; no per-pixel Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

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
    """[N, H, W, C] or [N, H, W] uint8 -> the same at (height, width).

    Default: PIL's bilinear filter, one image at a time, as detectron2's ``ResizeTransform`` (and the reference's
    AVSS preprocessing): PIL widens the filter when it shrinks, so OpenCV's linear and area filters give other
    pixels. ``nearest`` (labels, maskiges): OpenCV's exact nearest neighbour on the whole stack in one call, the
    same pixels as PIL's NEAREST (checked on 300 random size pairs)."""
    n, h, w = images.shape[:3]
    if (h, w) == (height, width):
        return images
    channels = images.shape[3] if images.ndim == 4 else 1
    if not nearest:
        return _pil_bilinear(images.reshape(n, h, w, channels), height, width).reshape(
            (n, height, width, *images.shape[3:]))
    stacked = np.ascontiguousarray(np.moveaxis(images.reshape(n, h, w, channels), 0, 2).reshape(h, w, n * channels))
    out = np.empty((height, width, n * channels), dtype=images.dtype)
    step = 128  # channels are independent, so any grouping works: OpenCV 5 takes at most 128 per call
    for start in range(0, n * channels, step):
        part = cv2.resize(np.ascontiguousarray(stacked[..., start:start + step]), (width, height),
                          interpolation=cv2.INTER_NEAREST_EXACT)
        out[..., start:start + step] = part.reshape(height, width, -1)
    out = np.moveaxis(out.reshape(height, width, n, channels), 2, 0)
    return np.ascontiguousarray(out if images.ndim == 4 else out[..., 0])


def _pil_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, height, width, C], PIL bilinear per image (RGB when C is 3, else per channel)."""
    out = np.empty((images.shape[0], height, width, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(np.asarray(images, dtype=np.uint8)):
        if image.shape[2] == 3:
            out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height),
                                                                                   Image.BILINEAR))
        else:
            for c in range(image.shape[2]):
                plane = Image.fromarray(np.ascontiguousarray(image[..., c]))
                out[i, ..., c] = np.asarray(plane.resize((width, height), Image.BILINEAR))
    return out


def uncrop_centre(images: np.ndarray, height: int, width: int, fill: int = IMAGE_PAD) -> np.ndarray:
    """[N, h, w, C] images of a centre-cropped square -> [N, height, width, C]: resized to the frame's short side and
    put back where the AVSS preprocessing's centre crop was (``avss_crop_geometry``), ``fill`` around (COMBO's AVSS
    training maskiges cover the centre crop only). Nearest neighbour, as the preprocessing made them."""
    side = min(height, width)
    out = np.full((images.shape[0], height, width, *images.shape[3:]), fill, dtype=images.dtype)
    top, left = _centre_offsets(height, width, side, side)
    out[:, top:top + side, left:left + side] = resize_images(images, side, side, nearest=True)
    return out


def square_short_side(clip: ClipArrays) -> ClipArrays:
    """A clip squashed to the square of its frames' short side (frames bilinear, labels and maskiges nearest): the
    first step of VCT's AVSS training mapper, before the random resize and crop."""
    side = min(clip.frames.shape[1:3])
    maskiges = None if clip.maskiges is None else resize_images(clip.maskiges, side, side, nearest=True)
    return ClipArrays(resize_images(clip.frames, side, side), resize_images(clip.masks, side, side, nearest=True),
                      maskiges)


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: scale the short side to ``short``, the long side to at most ``max_size``."""
    scale = short / min(h, w)
    new_h, new_w = h * scale, w * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def avss_crop_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """The reference's AVSS preprocessing of a training frame (``crop_resize_img`` of
    avs_tools/process_avssimg2fixsize.py): the short side to ``size``, the long side ``int(long * size / short)``
    (truncated), then a size x size centre crop -> (new_h, new_w, top, left)."""
    if w > h:
        new_h, new_w = size, int(1.0 * w * size / h)
    else:
        new_h, new_w = int(1.0 * h * size / w), size
    top, left = _centre_offsets(new_h, new_w, size, size)
    return new_h, new_w, top, left


def _centre_offsets(h: int, w: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """The preprocessing's centre-crop corner: ``int(round((side - crop) / 2))`` (Python's round, half to even)."""
    return int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))


def _resize_clip(clip: ClipArrays, height: int, width: int, maskiges_nearest: bool = True) -> ClipArrays:
    maskiges = None if clip.maskiges is None else resize_images(clip.maskiges, height, width, maskiges_nearest)
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
    """SSD-style photometric distortion (detectron2's ``ColorAugSSDTransform``): one draw of its parameters. The
    reference draws anew on every image it is applied to, so ``train_transform`` draws one per frame and one per
    maskige."""

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
        """[N, H, W, 3] uint8 RGB -> the same, distorted: brightness, then contrast, saturation, hue (or saturation,
        hue, contrast), in the reference's order."""
        if self.brightness is not None:
            images = _affine(images, 1.0, self.brightness)
        if self.contrast_first and self.contrast is not None:
            images = _affine(images, self.contrast, 0.0)
        # saturation and hue each in their own HSV round trip, as the reference (uint8 HSV is lossy: one round
        # trip for both would give other pixels)
        if self.saturation is not None:
            images = self._in_hsv(images, 1, lambda v: _affine(v, self.saturation, 0.0))
        if self.hue is not None:
            images = self._in_hsv(images, 0, lambda v: ((v.astype(np.int16) + self.hue) % 180).astype(np.uint8))
        if not self.contrast_first and self.contrast is not None:
            images = _affine(images, self.contrast, 0.0)
        return images

    @staticmethod
    def _in_hsv(images: np.ndarray, channel: int, change) -> np.ndarray:
        n, h, w, _ = images.shape
        hsv = cv2.cvtColor(np.ascontiguousarray(images.reshape(n * h, w, 3)), cv2.COLOR_RGB2HSV)
        hsv[..., channel] = change(hsv[..., channel])
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
        clip = ClipArrays(clip.frames, clip.masks, resize_images(clip.maskiges, h, w, nearest=True))
    if rng is None and random_resize:
        return _resize_clip(clip, size, size)
    if random_resize:
        short = int(RESIZE_FACTORS[rng.integers(len(RESIZE_FACTORS))] * size)
        new_h, new_w = shortest_edge_size(h, w, short, MAX_SIZE_FACTOR * size)
        # the reference's mapper resizes maskiges with the frames' transform: bilinear
        clip = _resize_clip(clip, new_h, new_w, maskiges_nearest=False)
        crop_h, crop_w = min(size, new_h), min(size, new_w)
        top, left = int(rng.integers(new_h - crop_h + 1)), int(rng.integers(new_w - crop_w + 1))
    else:
        new_h, new_w, top, left = avss_crop_geometry(h, w, size)
        clip = _resize_clip(clip, new_h, new_w)
        crop_h, crop_w = min(size, new_h), min(size, new_w)
    clip = _crop_clip(clip, top, left, crop_h, crop_w)
    if rng is None:
        return _pad_clip(clip, size)
    frames, maskiges = jitter_clip(clip.frames, clip.maskiges, rng)
    masks = clip.masks
    if rng.integers(2):
        frames, masks = frames[:, :, ::-1], masks[:, :, ::-1]
        maskiges = None if maskiges is None else maskiges[:, :, ::-1]
    return _pad_clip(ClipArrays(np.ascontiguousarray(frames), np.ascontiguousarray(masks),
                                None if maskiges is None else np.ascontiguousarray(maskiges)), size)


def jitter_clip(frames: np.ndarray, maskiges: np.ndarray | None, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """frames [T, H, W, 3] and maskiges [T, H, W, 3] (or None) uint8 -> the same, each image with its own
    ``ColourJitter`` draw, in the reference's order (frame t, then maskige t)."""
    out_frames, out_maskiges = np.empty_like(frames), None if maskiges is None else np.empty_like(maskiges)
    for t in range(frames.shape[0]):
        out_frames[t] = ColourJitter.random(rng)(frames[t:t + 1])[0]
        if maskiges is not None:
            out_maskiges[t] = ColourJitter.random(rng)(maskiges[t:t + 1])[0]
    return out_frames, out_maskiges


def eval_transform(clip: ClipArrays, size: int, label_size: tuple[int, int] | None = None) -> ClipArrays:
    """Frames (bilinear) and maskiges (nearest) resized to size x size when they differ; labels kept at their own
    size, or resized with nearest neighbour to ``label_size`` (h, w) when given (AVSS is scored at 224 x 224)."""
    maskiges = None if clip.maskiges is None else resize_images(clip.maskiges, size, size, nearest=True)
    masks = clip.masks
    if label_size is not None:
        masks = resize_images(masks, *label_size, nearest=True)
    return ClipArrays(resize_images(clip.frames, size, size), masks, maskiges)
