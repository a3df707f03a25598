"""AVSBench datasets (S4, MS3, AVSS), their transforms and audio, the synthetic data generator and the checker.

Modules: ``layout`` (paths and metadata of the official layouts), ``classes`` (class names, AVSS palette),
``images`` and ``audio`` (file reading and writing), ``transforms`` (augmentation and resizing), ``datasets``
(the torch datasets), ``synth`` (the "sounding shapes" generator), ``check`` (``av2ts data check``).
"""

from av2ts_cli.avsbench import SUBSETS
from av2ts_cli.data.datasets import AVSDataset, build_dataset, collate_clips
from av2ts_cli.data.layout import SPLITS, Video, list_videos, resolve_root

__all__ = ["AVSDataset", "SPLITS", "SUBSETS", "Video", "build_dataset", "collate_clips", "list_videos",
           "resolve_root"]
