"""AVSBench datasets (S4, MS3, AVSS), their transforms and audio, the synthetic data generator and the checker.

Modules: ``layout`` (paths and metadata of the official layouts), ``images`` and ``audio`` (file reading and
writing), ``transforms`` (augmentation and resizing), ``datasets`` (the torch datasets), ``scene`` and ``synth``
(the "sounding shapes" generator), ``check`` (``av2ts data check``). The class names are ``av2ts_cli.classes``.

The torch datasets are imported on first use (PEP 562 ``__getattr__``): ``av2ts overlay`` reads mask images through
``data.images`` and ``classes`` and should not wait seconds for torch.
"""

import importlib

from av2ts_cli.avsbench import SUBSETS
from av2ts_cli.data.layout import SPLITS, Video, list_videos, resolve_root

_FROM_DATASETS = ("AVSDataset", "build_dataset", "collate_clips")

__all__ = ["AVSDataset", "SPLITS", "SUBSETS", "Video", "build_dataset", "collate_clips", "list_videos",
           "resolve_root"]


def __getattr__(name: str):
    if name in _FROM_DATASETS:
        return getattr(importlib.import_module("av2ts_cli.data.datasets"), name)  # local: torch, on first use
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
