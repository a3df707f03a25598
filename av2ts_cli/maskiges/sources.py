"""Class-agnostic masks made elsewhere: COMBO's step-1 output (``make_SAM_mask.py``), read for ``--masks-from DIR``.

One ``<frame stem>_mask.npy`` per frame, an array (N, H, W) of bool or 0/1 at the frame's resolution, at the
frame's path relative to the subset's frame folder:

- S4: ``DIR/<split>/<category>/<video>/<video>_<k>_mask.npy`` (frames: ``s4_data/visual_frames/<split>/...``);
- MS3: ``DIR/<video>/<video>.mp4_<k>_mask.npy`` (frames: ``ms3_data/visual_frames/<video>/...``);
- AVSS: ``DIR/<label>/<uid>/frames/<i>_mask.npy`` (frames: ``<label>/<uid>/frames/<i>.jpg``), or in
  ``processed_frames/`` beside it: the reference's ``make_SAM_mask.py`` ran on the 224 x 224 processed frames
  while its ``mask_precess_ss.py`` reads ``frames/``; both are accepted (``frames/`` first).

``DIR`` may also be COMBO's ``--output`` root, which holds the same tree below ``AVSBench_object/Single-source/
s4_data/visual_frames``, ``AVSBench_object/Multi-sources/ms3_data/visual_frames`` or ``AVSBench_semantic``.
Arrays are loaded without pickle (an object array is refused, not executed). Every problem is one ``DataError``
naming the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from av2ts_cli.data.layout import DATA_FOLDERS, OBJECT_FOLDER, SUBSET_FOLDERS, Video, check_subset
from av2ts_cli.errors import DataError
from av2ts_cli.maskiges.render import check_masks

MASK_SUFFIX = "_mask.npy"
AVSS_PROCESSED = "processed_frames"
NPY_MAGIC = b"\x93NUMPY"


def _candidate_bases(folder: Path, subset: str) -> list[Path]:
    """Where the per-frame tree may start below ``folder``, most specific first (``folder`` itself last)."""
    if subset == "avss":
        return [folder / SUBSET_FOLDERS["avss"], folder]
    frames = Path(DATA_FOLDERS[subset], "visual_frames")
    subset_folder = Path(SUBSET_FOLDERS[subset])
    return [folder / OBJECT_FOLDER / subset_folder / frames, folder / subset_folder / frames, folder / frames,
            folder / "visual_frames", folder]


class MaskSource:
    """The ``.npy`` masks of a subset below ``folder``."""

    def __init__(self, folder: str | os.PathLike, subset: str):
        self.subset = check_subset(subset)
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(folder, "no such masks folder" if not folder.exists() else "is not a folder")
        self.folder = folder
        self.base = next(base for base in _candidate_bases(folder, subset) if base.is_dir())

    def relative(self, video: Video, index: int) -> Path:
        """The mask file of frame ``index`` relative to the tree's base."""
        frame = video.frames[index]
        if self.subset == "avss":  # <label>/<uid>/frames/<i>.jpg
            key = Path(video.group, video.name, frame.parent.name)
        elif self.subset == "s4":
            key = Path(video.split, video.group, video.name)
        else:
            key = Path(video.name)
        return key / f"{frame.stem}{MASK_SUFFIX}"

    def path(self, video: Video, index: int) -> Path:
        """The mask file of frame ``index`` (for AVSS, the ``processed_frames/`` one when only it exists)."""
        path = self.base / self.relative(video, index)
        if self.subset == "avss" and not path.exists():
            processed = path.parent.parent / AVSS_PROCESSED / path.name
            if processed.exists():
                return processed
        return path

    def load(self, video: Video, index: int, frame_size: tuple[int, int] | None = None) -> np.ndarray:
        """bool (N, H, W) masks of frame ``index``; ``frame_size`` (width, height), when given, is checked against
        (W, H) unless the file is an AVSS ``processed_frames/`` one (224 x 224 by construction)."""
        path = self.path(video, index)
        if path.parent.name == AVSS_PROCESSED and self.subset == "avss":
            frame_size = (224, 224)
        return load_masks(path, frame_size)


def load_masks(path: str | os.PathLike, frame_size: tuple[int, int] | None = None) -> np.ndarray:
    """One ``_mask.npy``: bool (N, H, W). DataError naming the file if it is missing, unreadable, not a numeric
    (N, H, W) array of 0/1, or (with ``frame_size`` = (width, height)) of another size than the frame."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:  # numpy would take any other file for a pickle
            raise DataError(path, "not a .npy file (no NumPy header)")
        masks = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, "missing mask file") from None
    except ValueError as err:  # an object array needs pickle; a short or broken array says why
        reason = "holds Python objects (refused: loading them would run pickle)" if "pickle" in str(err) \
            else f"not a valid .npy array ({err})"
        raise DataError(path, reason) from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(path, f"unreadable mask file: {err}") from None
    try:
        masks = check_masks(masks)
    except ValueError as err:
        raise DataError(path, str(err)) from None
    if frame_size is not None and (masks.shape[2], masks.shape[1]) != tuple(frame_size):
        raise DataError(path, f"masks are {masks.shape[2]}x{masks.shape[1]}, the frame is "
                              f"{frame_size[0]}x{frame_size[1]}")
    return masks
