"""Images of the layouts (av2ts_cli/data/images.py): label PNGs read back as class indices."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from av2ts_cli.data.images import read_mask, read_rgb, write_jpeg, write_png


def test_binary_masks_accept_0_255_and_0_1(tmp_path):
    write_png(tmp_path / "a.png", np.array([[0, 255, 0, 255]], np.uint8))
    write_png(tmp_path / "b.png", np.array([[0, 1, 1, 0]], np.uint8))
    assert read_mask(tmp_path / "a.png", "binary").tolist() == [[0, 1, 0, 1]]
    assert read_mask(tmp_path / "b.png", "binary").tolist() == [[0, 1, 1, 0]]


def test_binary_masks_take_only_255_as_the_object(tmp_path):
    """The reference's ``pixel // 255``: grey values (anti-aliased or resampled edges) are background, however
    bright; a 16-bit mask's object is anything from 255 up."""
    write_png(tmp_path / "grey.png", np.array([[0, 1, 100, 127, 128, 200, 254, 255]], np.uint8))
    assert read_mask(tmp_path / "grey.png", "binary").tolist() == [[0, 0, 0, 0, 0, 0, 0, 1]]
    Image.fromarray(np.array([[0, 254, 255, 65535]], np.uint16)).save(tmp_path / "wide.png")
    assert read_mask(tmp_path / "wide.png", "binary").tolist() == [[0, 0, 1, 1]]


def test_images_are_written_atomically(tmp_path):
    """A save that fails part-way leaves the previous file as it was and no temp beside it."""
    path = write_jpeg(tmp_path / "frame.jpg", np.full((4, 4, 3), 200, np.uint8))
    before = path.read_bytes()
    with pytest.raises(OSError, match="RGBA"):
        write_jpeg(path, np.zeros((4, 4, 4), np.uint8))  # RGBA: PIL opens its file, then refuses the mode
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["frame.jpg"]
    assert read_rgb(path).shape == (4, 4, 3)
