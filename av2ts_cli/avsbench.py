"""The AVSBench contract: the rules that make a clip, its audio and its labels line up, defined once.

Everything that reads or makes AVSBench-format data (``data/``, ``sampling``, ``predict``, ``render``, the synthetic
generator, the benchmarks) imports these names; nothing else in the package writes the numbers again. The network
(``model/``) sees them through ``config``, its only window on the rest of the package. Where each rule comes from
is in ``docs/data-and-metrics.md``.

Ground floor: the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

SUBSETS = ("s4", "ms3", "avss")
SUBSET_CLASSES = {"s4": 2, "ms3": 2, "avss": 71}  # classes the network predicts, background included

# Audio: 16 kHz mono, one 0.96 s VGGish log-mel example (96 frames of 10 ms, 64 mel bands) per second of video.
SAMPLE_RATE = 16000
MEL_BANDS = 64
EXAMPLE_FRAMES = 96
EXAMPLE_SECONDS = 0.96  # also the hop: the examples of a clip's audio follow each other without overlap (k * 0.96 s)
EXAMPLE_SPAN = 0.975  # seconds of audio one example reads: 96 hops of 10 ms plus one 25 ms window

# Frames: AVSBench kept the 16th of the 16 frames it extracted in each second, so frame k (0-based) shows k + 15/16 s.
FRAME_OFFSET = 15 / 16

# Labels: pixels with this value are outside the image (padding after a resize) and count for nothing.
IGNORE_INDEX = 255

T = TypeVar("T")


def frame_time(k: int) -> float:
    """The time (s) of AVSBench's frame for second ``k`` (0-based)."""
    return k + FRAME_OFFSET


def pad_by_repeating_last(items: Sequence[T], length: int) -> list[T]:
    """``items`` padded to ``length`` by repeating its last item, as AVSBench pads a clip shorter than its window
    (a 4 s tail of a 5-frame window is frames 0, 1, 2, 3, 3). ``items`` must not be empty."""
    if not items:
        raise ValueError("cannot pad an empty sequence by repeating its last item")
    items = list(items)
    return items + [items[-1]] * max(0, length - len(items))


def subsets_compatible(trained: str, wanted: str) -> bool:
    """Whether a network trained for ``trained`` can run on ``wanted`` data: the same subset, or S4 and MS3, which
    share the binary output (sounding object vs background)."""
    return trained == wanted or {trained, wanted} == {"s4", "ms3"}
