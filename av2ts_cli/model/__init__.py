"""The AV2TS network (``build_model``) and nothing else: training, data and I/O live outside this package."""

from __future__ import annotations

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.av2ts import AV2TS, class_map, foreground_probability
from av2ts_cli.model.combo import COMBO


def build_model(cfg: ModelConfig) -> AV2TS:
    """A randomly initialised network of ``cfg.family`` (AV2TS or COMBO, which shares AV2TS's ``segment``) for
    ``cfg`` (no downloads; load weights with ``av2ts_cli.weights``)."""
    return COMBO(cfg) if cfg.family == "combo" else AV2TS(cfg)


__all__ = ["AV2TS", "COMBO", "build_model", "class_map", "foreground_probability"]
