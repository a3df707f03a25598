"""Class names and colours of the AVSBench subsets (docs/data-and-metrics.md, 'Classes and palettes').

S4 and MS3 are binary (background, sounding object); S4 videos also carry one of 23 categories. AVSS has 71 classes,
background first, in the key order of the official ``label2idx.json``; its colour-coded labels use the PASCAL-VOC
bit-interleaved palette.
"""

from __future__ import annotations

import numpy as np

BINARY_CLASSES = ("background", "sounding object")

S4_CATEGORIES = (
    "baby_laughter", "female_singing", "male_speech",
    "dog_barking", "cat_meowing", "lions_roaring", "horse_clip-clop", "coyote_howling", "mynah_bird_singing",
    "playing_acoustic_guitar", "playing_tabla", "playing_violin", "playing_piano", "playing_ukulele",
    "playing_glockenspiel",
    "helicopter", "race_car", "driving_buses", "ambulance_siren",
    "typing_on_computer_keyboard", "chainsawing_trees", "cap_gun_shooting", "lawn_mowing",
)

AVSS_CLASSES = (
    "background", "accordion", "airplane", "axe", "baby", "bassoon", "bell", "bird", "boat", "boy", "bus", "car",
    "cat", "cello", "clarinet", "clipper", "clock", "dog", "donkey", "drum", "duck", "elephant", "emergency-car",
    "erhu", "flute", "frying-food", "girl", "goose", "guitar", "gun", "guzheng", "hair-dryer", "handpan",
    "harmonica", "harp", "helicopter", "hen", "horse", "keyboard", "leopard", "lion", "man", "marimba",
    "missile-rocket", "motorcycle", "mower", "parrot", "piano", "pig", "pipa", "saw", "saxophone", "sheep", "sitar",
    "sorna", "squirrel", "tabla", "tank", "tiger", "tractor", "train", "trombone", "truck", "trumpet", "tuba",
    "ukulele", "utv", "vacuum-cleaner", "violin", "wolf", "woman",
)
AVSS_NUM_CLASSES = len(AVSS_CLASSES)  # 71


def avss_palette(num_classes: int = AVSS_NUM_CLASSES) -> np.ndarray:
    """[num_classes, 3] uint8 RGB: class j's bit 3i goes to bit 7-i of R, bit 3i+1 to G, bit 3i+2 to B."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return palette


def label2idx(names: tuple[str, ...] = AVSS_CLASSES) -> dict[str, int]:
    """The ``label2idx.json`` mapping: names to 1..71 in class order (readers use the key order, value - 1)."""
    return {name: index + 1 for index, name in enumerate(names)}
