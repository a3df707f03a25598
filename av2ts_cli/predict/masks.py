"""Per-frame mask outputs of ``av2ts predict``: upsampling to the video's display size, PNG files, COCO RLE and
the per-frame records of ``frames.jsonl``.

Two kinds of model (``ModelConfig.num_classes``):
- binary (S4/MS3, 2 classes): the probability of the sounding object is thresholded; PNGs are grey 0/255, the
  AVSBench ``save_mask`` convention.
- semantic (AVSS, 71 classes): the argmax class; PNGs are indexed ("P" mode) with the AVSS palette embedded, so
  the pixel value is the class id and viewers show the AVSBench colours.

COCO RLE is our own encoder of the pycocotools format (column-major runs starting with background, counts
compressed to a string), so it needs no compiled dependency and serialises straight to JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from av2ts_cli.classes import avss_palette
from av2ts_cli.data.images import write_png
from av2ts_cli.files import atomic_open
from av2ts_cli.model import foreground_probability

# Upsampling a K-class score map to a 4K frame at once would need K x 33 MB; rows are done in bands of at most
# this many float32 values (64 MB).
_BAND_VALUES = 1 << 24


# ---------------------------------------------------------------------------------------------------- upsampling
def _bilinear_taps(source: int, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 [target] and weights of i1 [target] of a bilinear resize with align_corners=False
    (the sampling of ``F.interpolate(mode="bilinear")``)."""
    position = ((torch.arange(target, dtype=torch.float64) + 0.5) * source / target - 0.5).clamp(min=0)
    low = position.floor().long().clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    return low, high, (position - low).float()


def upsample_probability(probability: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """probability [h, w] -> [H, W] bilinear (``size`` = (W, H)), float32 on the CPU."""
    width, height = size
    grid = probability.float()[None, None]
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].cpu()


def upsample_class_map(scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """scores [K, h, w] -> uint8 [H, W] argmax of the bilinearly upsampled scores (``size`` = (W, H)).

    Equal to ``F.interpolate(scores[None], (H, W), mode="bilinear").argmax(1)``, computed in bands of rows so the
    memory stays bounded for large frames and many classes.
    """
    width, height = size
    scores = scores.float().cpu()
    classes, source_h, source_w = scores.shape
    y0, y1, wy = _bilinear_taps(source_h, height)
    x0, x1, wx = _bilinear_taps(source_w, width)
    band = max(1, _BAND_VALUES // max(1, classes * width))
    out = np.empty((height, width), np.uint8)
    for start in range(0, height, band):
        rows = slice(start, min(height, start + band))
        weight = wy[rows][None, :, None]
        vertical = scores[:, y0[rows]] * (1 - weight) + scores[:, y1[rows]] * weight  # [K, R, w]
        full = vertical[:, :, x0] * (1 - wx) + vertical[:, :, x1] * wx  # [K, R, W]
        out[rows] = full.argmax(0).to(torch.uint8).numpy()
    return out


# ------------------------------------------------------------------------------------------------------ COCO RLE
def rle_encode(mask: np.ndarray) -> dict:
    """bool [H, W] -> COCO compressed RLE {"size": [H, W], "counts": str}: run lengths in column-major order,
    starting with a (possibly empty) run of zeros, compressed like pycocotools' ``rleToString``."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    flat = mask.T.ravel()  # column-major
    if flat.size == 0:
        return {"size": [height, width], "counts": ""}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return {"size": [height, width], "counts": _counts_to_string(runs.tolist())}


def _counts_to_string(counts: Sequence[int]) -> str:
    # Each count (after the first two: its difference to the count two before) in 5-bit groups, low first; bit 5
    # says "more follows"; +48 keeps it printable.
    chars = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative differences end at -1
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(chars)


def rle_counts(rle: dict) -> list[int]:
    """The run lengths of a compressed COCO RLE (inverse of the string compression)."""
    text, counts, position = rle["counts"], [], 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            position += 1
            shift += 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """Compressed COCO RLE -> bool [H, W]."""
    height, width = rle["size"]
    counts = rle_counts(rle)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != height * width:
        raise ValueError(f"RLE runs cover {flat.size} pixels, the size is {height}x{width}")
    return flat.reshape(width, height).T


def bounding_box(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the True pixels of bool [H, W] (COCO order); [0, 0, 0, 0] when none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0]
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


# ------------------------------------------------------------------------------------------------- frame outputs
@dataclass(frozen=True)
class FrameMask:
    """One predicted frame at display size: ``classes`` uint8 [H, W] class ids (0 background; binary models: 0/1)
    and, for binary models, ``probability`` float32 [H, W] of the sounding object."""

    classes: np.ndarray
    probability: np.ndarray | None = None


def frame_mask(scores: torch.Tensor, size: tuple[int, int], threshold: float) -> FrameMask:
    """The model's semantic map of one frame, scores [K, h, w] (``AV2TS.segment``), at display ``size`` (W, H).

    Binary models (K = 2): softmax over the two channels (``foreground_probability``), upsampled, then
    ``> threshold``. Semantic models: the argmax class of the upsampled scores (no threshold, as the official
    evaluation)."""
    if scores.shape[0] == 2:
        probability = upsample_probability(foreground_probability(scores), size).numpy()
        return FrameMask((probability > threshold).astype(np.uint8), probability)
    return FrameMask(upsample_class_map(scores, size))


def write_mask_png(path: str | os.PathLike, mask: FrameMask, binary: bool) -> Path:
    """Binary models: grey 0/255 PNG; semantic models: indexed PNG with the AVSS palette (values = class ids)."""
    if binary:
        return write_png(path, mask.classes * np.uint8(255))
    return write_png(path, mask.classes, palette=avss_palette(256))


def class_records(mask: FrameMask, class_names: Sequence[str], rle: bool) -> list[dict]:
    """One record per class present (background excluded): id, name, area (fraction of the frame), pixels, bbox
    [x, y, w, h], and for binary models score (mean probability inside the mask); ``rle`` adds "segmentation"."""
    classes = mask.classes
    total = max(1, classes.size)
    pixels = np.bincount(classes.ravel(), minlength=len(class_names))
    records = []
    for class_id in np.flatnonzero(pixels[1:]) + 1:
        region = classes == class_id
        record = {"id": int(class_id), "name": _name(class_names, class_id), "area": round(pixels[class_id] / total, 6),
                  "pixels": int(pixels[class_id]), "bbox": bounding_box(region)}
        if mask.probability is not None:
            record["score"] = round(float(mask.probability[region].mean()), 4)
        if rle:
            record["segmentation"] = rle_encode(region)
        records.append(record)
    return records


def _name(class_names: Sequence[str], class_id: int) -> str:
    return class_names[class_id] if class_id < len(class_names) else f"class_{class_id}"


class CocoWriter:
    """Streams a COCO-style ``masks.coco.json`` (images = sampled frames, annotations = one compressed RLE per
    frame and class present, categories = the model's classes without background): ``with CocoWriter(...) as
    coco: coco.add(...)``. The file is written to a temp beside ``path`` (``files.atomic_open``) and appears only
    when the block ends without an exception. Memory stays bounded: annotations are written as they come."""

    def __init__(self, path: Path, class_names: Sequence[str], images: Sequence[dict], info: dict):
        self.path = Path(path)
        self.categories = [{"id": i, "name": name} for i, name in enumerate(class_names) if i > 0]
        self.images, self.info = list(images), info
        self.count = 0
        self._stack = contextlib.ExitStack()
        self.file = None

    def __enter__(self) -> CocoWriter:
        with contextlib.ExitStack() as stack:
            self.file = stack.enter_context(atomic_open(self.path))
            head = json.dumps({"info": self.info, "categories": self.categories, "images": self.images})
            self.file.write(head[:-1] + ', "annotations": [')
            self._stack = stack.pop_all()
        return self

    def add(self, image_id: int, record: dict) -> None:
        annotation = {"id": self.count + 1, "image_id": image_id, "category_id": record["id"],
                      "segmentation": record["segmentation"], "area": record["pixels"], "bbox": record["bbox"],
                      "iscrowd": 0}
        if "score" in record:
            annotation["score"] = record["score"]
        self.file.write(("," if self.count else "") + "\n" + json.dumps(annotation))
        self.count += 1

    def __exit__(self, *exc) -> bool:
        if exc[0] is not None:  # the temp is removed, the exception goes on
            return self._stack.__exit__(*exc)
        with self._stack:
            self.file.write("\n]}\n")
        return False
