"""The AV2TS network (``build_model``) and nothing else: training, data and I/O live outside this package."""

from __future__ import annotations

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.av2ts import AV2TS, class_map, foreground_probability
from av2ts_cli.model.avsegformer import AVSegFormer
from av2ts_cli.model.combo import COMBO
from av2ts_cli.model.vct import VCT


def build_model(cfg: ModelConfig) -> AV2TS:
    """A randomly initialised network of ``cfg.family`` (AV2TS; COMBO, which shares AV2TS's ``segment``; VCT and
    AVSegFormer, whose ``segment`` has the same contract) for ``cfg`` (no downloads; load weights with
    ``av2ts_cli.weights``)."""
    if cfg.family == "avsegformer":
        return AVSegFormer(cfg)
    if cfg.family == "vct":
        return VCT(cfg)
    return COMBO(cfg) if cfg.family == "combo" else AV2TS(cfg)


__all__ = ["AV2TS", "AVSegFormer", "COMBO", "VCT", "build_model", "class_map", "foreground_probability"]
