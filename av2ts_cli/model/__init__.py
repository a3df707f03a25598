"""The AV2TS network (``build_model``) and nothing else: training, data and I/O live outside this package."""

from __future__ import annotations

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.av2ts import AV2TS, class_map, foreground_probability


def build_model(cfg: ModelConfig) -> AV2TS:
    """A randomly initialised AV2TS network for ``cfg`` (no downloads; load weights with ``av2ts_cli.weights``)."""
    return AV2TS(cfg)


__all__ = ["AV2TS", "build_model", "class_map", "foreground_probability"]
