"""Reading and writing the images of the AVSBench layouts: frames, labels (0/255, class index, palette colour) and
maskiges. PIL decodes (a broken file becomes a ``DataError`` naming it); array work is vectorised numpy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from av2ts_cli import files
from av2ts_cli.classes import avss_palette
from av2ts_cli.data.layout import MASK_BINARY, MASK_INDEX, MASK_RGB
from av2ts_cli.errors import DataError


def _open(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise DataError(path, f"missing {what}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's ways of saying corrupt
        raise DataError(path, f"unreadable {what}: {err}") from None


def read_rgb(path: str | os.PathLike, what: str = "frame") -> np.ndarray:
    """uint8 [H, W, 3] RGB (palette, grey and alpha images converted)."""
    image = _open(Path(path), what)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def read_mask(path: str | os.PathLike, mask_format: str, palette: np.ndarray | None = None) -> np.ndarray:
    """A label PNG -> uint8 [H, W] class indices (255 = ignore).

    MASK_BINARY: 0/255 masks -> {0, 1} by the reference's ``pixel // 255``: only 255 is the object, any grey
    value (anti-aliased or resampled masks) is background (docs/model.md, "Training fidelity"); masks whose values
    are all 0/1 are taken as they are. MASK_INDEX: the pixel values are the class indices; MASK_RGB: colours
    matched exactly against ``palette`` (default: the AVSS palette), any other colour is background, as the
    official ``color_mask_to_label``."""
    path = Path(path)
    image = _open(path, "mask")
    if mask_format == MASK_RGB:
        return rgb_to_index(np.asarray(image.convert("RGB")), avss_palette() if palette is None else palette)
    if image.mode not in ("L", "P", "1", "I", "I;16"):
        image = image.convert("L")
    values = np.asarray(image)
    if mask_format == MASK_INDEX:
        if values.dtype != np.uint8:
            if values.size and (values.min() < 0 or values.max() > 255):
                raise DataError(path, f"class indices outside 0..255 ({values.min()}..{values.max()})")
            values = values.astype(np.uint8)
        return values
    if mask_format != MASK_BINARY:
        raise ValueError(f"unknown mask format {mask_format!r}")
    if values.dtype == bool or (values.size and values.max() <= 1):
        return values.astype(np.uint8)
    # the reference's S4/MS3 mappers: `pixel // 255`; 16-bit masks: anything from 255 up (the reference would
    # make a class index above 1 of it)
    return (values >= 255).astype(np.uint8)


def rgb_to_index(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] colours -> uint8 [H, W] palette indices; colours not in the palette -> 0."""
    keys = _colour_keys(rgb)
    table = _colour_keys(palette)
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    position = np.clip(np.searchsorted(sorted_table, keys), 0, len(table) - 1)
    found = sorted_table[position] == keys
    return np.where(found, order[position], 0).astype(np.uint8)


def _colour_keys(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb).astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def image_header(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image after checking its structure (PNG chunk CRCs; JPEG markers) without decoding
    the pixels. Raises DataError for a missing or broken file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(path, f"unreadable image: {err}") from None


def _save(path: Path, image: Image.Image, **options) -> Path:
    """``image`` saved atomically as JPEG (a .jpg/.jpeg name) or PNG."""
    image_format = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with files.atomic_path(path) as temp:
        image.save(temp, format=image_format, **options)
    return path


def write_png(path: str | os.PathLike, array: np.ndarray, palette: np.ndarray | None = None,
              compress_level: int = 1) -> Path:
    """Write uint8 [H, W] (grey, or indices with ``palette`` [K, 3]) or [H, W, 3] RGB as PNG, atomically (zlib
    level 1 by default: several times faster than PIL's 6, files about a fifth larger)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if palette is None:
        image = Image.fromarray(array)
    else:
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(palette)] = palette
        image.putpalette(flat.reshape(-1).tolist())
    return _save(Path(path), image, compress_level=compress_level)


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 92) -> Path:
    """Write uint8 [H, W, 3] RGB as JPEG, atomically."""
    return _save(Path(path), Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), quality=quality)
