"""Class-agnostic masks -> maskige, exactly as COMBO's ``mask_precess_{s4,ms3,ss}.py`` and
``process_avssimg2fixsize.py`` make them: the Siam encoder's picture of each frame (docs/model.md, 'Siam encoder';
docs/data-and-metrics.md, 'Maskiges').

The id map: the masks ordered by pixel count, ascending (a stable sort: masks of equal area keep their order in the
file, where the reference's quicksort leaves ties unspecified); the smallest gets id 1, and the mask of rank k
(0-based) gives id k + 1 to the pixels no smaller mask took, so where masks overlap the smaller one wins;
background stays 0. The picture: the id map as an indexed PNG with the 150-colour ADE20K palette. Ids 150..255
have no palette colour and show black, as in COMBO's files.

More than 255 masks: a documented cap, not COMBO's behaviour. The reference computes ids in a wider integer type
and casts to uint8, so rank 255 (id 256) silently becomes background and rank 256 becomes id 1 again. Here ids are
clamped to 255 instead: every mask of rank >= 149 shows black either way, so the RGB picture is the one an
unbounded id map would give, and no pixel wraps to background or to another mask's colour.

Sizes: S4 and MS3 (and video frames) are resized to 224 x 224 with nearest neighbour and kept indexed. AVSS is
rendered at the frame's size, converted to RGB and fitted: training frames short side to 224 then the centre
224 x 224 crop, val/test squashed to 224 x 224, nearest (the reader, ``av2ts_cli.data.datasets``, maps them back
onto the frame: the crop into the centre for training, a plain resize otherwise).

The geometry rule (``GEOMETRIES``, ``geometry_for``): a model gets, at predict time, maskiges made the way the ones
it trained on were. COMBO made its S4 and MS3 maskiges from AVSBench's stored frames, which the official
preprocessing squashed to 224 x 224 (``make_SAM_mask.py`` reads ``s4_data/visual_frames``), so for COMBO and AV2TS
S4/MS3 models the generator sees the frame squashed to 224 x 224 (``square-224``; also far cheaper to post-process
than a 1080p frame); AVSS maskiges came from frames at their source size, then squashed to 224 x 224 as
``process_avssimg2fixsize.py`` does for val/test (``source-224``); VCT resizes the source-size maskige to 384 x 384,
nearest (spec ``vct.md`` section 1, ``source-384``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from av2ts_cli import files

MASKIGE_SIZE = 224  # COMBO's maskiges are 224 x 224 (the AVSBench object frames' size)
MAX_ID = 255  # ids are uint8; ranks past this are clamped (see the module docstring)
_ADE20K_HEX = (  # the standard ADE20K visualisation palette, 150 colours, RGB
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE = np.frombuffer(bytes.fromhex(_ADE20K_HEX), dtype=np.uint8).reshape(150, 3)


@dataclass(frozen=True)
class Geometry:
    """How a frame becomes a maskige: what the generator sees and the maskige's size."""

    name: str
    input_side: int | None  # the generator sees the frame squashed to input_side x input_side (None: source size)
    size: int  # the maskige's side (the id map resized nearest)
    made_by: str  # what the reference did

    def describe(self) -> dict:
        """The provenance record's ``geometry``."""
        seen = (f"the frame squashed to {self.input_side}x{self.input_side}" if self.input_side
                else "the frame at its source size")
        return {"name": self.name, "generator_input": seen, "maskige": f"{self.size}x{self.size}, nearest",
                "as": self.made_by}


GEOMETRIES = {g.name: g for g in (
    Geometry("square-224", MASKIGE_SIZE, MASKIGE_SIZE, "COMBO's S4/MS3 maskiges, made from AVSBench's 224x224 frames"),
    Geometry("source-224", None, MASKIGE_SIZE, "COMBO's AVSS maskiges (process_avssimg2fixsize.py, val/test)"),
    Geometry("source-384", None, 384, "VCT's maskiges: the source-size maskige resized to 384x384, nearest"),
)}
DEFAULT_GEOMETRY = "square-224"  # S4's, the maskige form of ``av2ts maskiges clip.mp4``


def geometry_for(family: str, subset: str) -> Geometry:
    """THE geometry rule: the maskige geometry a model of ``family`` trained on ``subset`` was trained with."""
    if family == "vct":
        return GEOMETRIES["source-384"]
    return GEOMETRIES["source-224" if subset == "avss" else "square-224"]


def check_masks(masks: np.ndarray) -> np.ndarray:
    """masks (N, H, W) bool or numeric 0/1 -> the same as bool. ValueError (its reason) for anything else."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got shape {masks.shape}")
    if masks.dtype == bool:
        return masks
    if masks.dtype.kind not in "biuf":
        raise ValueError(f"expected bool or 0/1 masks, got dtype {masks.dtype}")
    if masks.size and not np.isin(masks, (0, 1)).all():
        bad = masks[~np.isin(masks, (0, 1))].flat[0].item()
        raise ValueError(f"expected bool or 0/1 masks, found the value {bad!r}")
    return masks.astype(bool)


def id_map(masks: np.ndarray) -> np.ndarray:
    """masks (N, H, W) bool or 0/1 -> uint8 [H, W] ids: 0 background, rank + 1 by ascending area (stable for ties),
    the smaller mask winning where masks overlap, ranks past 254 clamped to 255. N = 0 gives all background."""
    masks = check_masks(masks)
    n, h, w = masks.shape
    ids = np.zeros((h, w), dtype=np.uint8)
    if n == 0:
        return ids
    areas = masks.reshape(n, -1).sum(axis=1, dtype=np.int64)
    order = np.argsort(areas, kind="stable")
    # Painting from the largest down to the smallest gives each pixel the smallest covering mask's id, which is
    # the reference's "fill only still-empty pixels, smallest first", with one masked write per mask
    for rank in range(n - 1, -1, -1):
        np.copyto(ids, min(rank + 1, MAX_ID), where=masks[order[rank]])
    return ids


def palette_image(ids: np.ndarray, size: int | None = MASKIGE_SIZE) -> Image.Image:
    """uint8 [H, W] ids -> an indexed ("P") image with the ADE20K palette (zero-padded to 256 entries: ids 150..255
    black, as PIL shows them in COMBO's 150-entry files), resized to ``size`` x ``size`` nearest unless None."""
    image = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))  # uint8 [H, W]: mode "L"
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.NEAREST)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(ADE20K_PALETTE)] = ADE20K_PALETTE
    image.putpalette(palette.reshape(-1).tobytes())
    return image


def fit_avss(image: Image.Image, train: bool, size: int = MASKIGE_SIZE) -> Image.Image:
    """A full-size AVSS maskige -> RGB ``size`` x ``size`` as ``process_avssimg2fixsize.py``: training frames scaled
    (nearest) so the short side is ``size`` (the long side truncated as the reference's ``int``), then the centre
    crop (offsets rounded); val/test squashed to ``size`` x ``size``."""
    image = image.convert("RGB")
    w, h = image.size
    if not train:
        return image.resize((size, size), Image.NEAREST)
    if w > h:
        new_w, new_h = int(1.0 * w * size / h), size
    else:
        new_w, new_h = size, int(1.0 * h * size / w)
    image = image.resize((new_w, new_h), Image.NEAREST)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def maskige_image(masks: np.ndarray, subset: str = "s4", train: bool = False,
                  size: int = MASKIGE_SIZE) -> Image.Image:
    """masks (N, H, W) -> the maskige as the ``subset``'s datasets store it: S4/MS3 (and videos, ``subset="s4"``)
    an indexed ``size`` x ``size`` image (224, or VCT's 384); AVSS an RGB 224 x 224 image fitted for the split
    (``train``)."""
    ids = id_map(masks)
    if subset == "avss":
        return fit_avss(palette_image(ids, size=None), train)
    return palette_image(ids, size)


def maskige_rgb(masks: np.ndarray, subset: str = "s4", train: bool = False) -> np.ndarray:
    """uint8 [224, 224, 3]: the RGB a dataset reader gets from the written file."""
    return np.asarray(maskige_image(masks, subset, train).convert("RGB"))


def write_maskige(path: str | os.PathLike, masks: np.ndarray, subset: str = "s4", train: bool = False,
                  size: int = MASKIGE_SIZE) -> Path:
    """Render ``masks`` (N, H, W) and write the PNG at ``path`` atomically (a reader sees no half-written file)."""
    path = Path(path)
    image = maskige_image(masks, subset, train, size)
    with files.atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path
