"""Class names and colours (av2ts_cli/classes.py): the AVSS palette and matching colour labels to it."""

from __future__ import annotations

import numpy as np

from av2ts_cli.classes import avss_palette
from av2ts_cli.data.images import rgb_to_index


def test_palette_and_rgb_labels():
    palette = avss_palette()
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[40].tolist() == [64, 0, 64] and palette[70].tolist() == [32, 128, 128]
    assert len({tuple(c) for c in palette}) == 71
    rgb = np.array([[palette[3], palette[70], [1, 2, 3]]], np.uint8)
    assert rgb_to_index(rgb, palette).tolist() == [[3, 70, 0]]  # unknown colours are background
