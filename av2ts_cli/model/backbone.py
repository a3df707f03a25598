"""Visual backbones (timm) and the Siam-encoder gates.

The backbone returns four feature maps at strides 4, 8, 16, 32 (res2..res5 in detectron2 terms). ResNet-50 keeps
detectron2's FrozenBN (statistics and affine fixed, convolutions trained); PVT-v2-b5 has LayerNorms only. The Siam
encoder is a second backbone of the same architecture with its own weights, run on the maskiges; its features are
added to the frame features through squeeze-and-excitation gates: ``F_l += SE_l(G_l) * G_l`` (docs/model.md, 'Siam
encoder').
"""

from __future__ import annotations

import timm
import torch
from timm.layers import DropPath
from torch import nn

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.blocks import freeze_batch_norm


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm ``features_only`` model (random init, no download): [N, 3, H, W] -> list of 4 maps, strides 4..32."""
    model = timm.create_model(cfg.backbone, pretrained=False, features_only=True,
                              out_indices=cfg.backbone_out_indices, **cfg.backbone_kwargs)
    reductions = model.feature_info.reduction()
    if list(reductions) != [4, 8, 16, 32]:
        raise ValueError(f"backbone {cfg.backbone} with out_indices {cfg.backbone_out_indices} gives strides "
                         f"{reductions}, not 4/8/16/32")
    if cfg.drop_path_rate > 0:
        _set_linear_drop_path(model, cfg.drop_path_rate)
    if cfg.frozen_bn:
        model = freeze_batch_norm(model)
    return model


def backbone_channels(backbone: nn.Module) -> list[int]:
    """Channels of the four feature maps of a ``create_backbone`` model."""
    return list(backbone.feature_info.channels())


def _set_linear_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks in order (the PVT-v2 rule; timm's own
    rule is stage-wise)."""
    blocks = [m for m in model.modules() if hasattr(m, "drop_path1") and hasattr(m, "drop_path2")]
    for block, p in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist(), strict=True):
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


class ChannelGate(nn.Module):
    """Squeeze-and-excitation gate: global average pool -> fc1 (C -> C/r) -> ReLU -> fc2 -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> gate [N, C, 1, 1] in (0, 1)."""
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))[:, :, None, None]


class SiamGates(nn.Module):
    """One ChannelGate per level; ``forward(features, siam_features)`` returns ``F_l + gate_l(G_l) * G_l``."""

    def __init__(self, channels: list[int], reduction: int = 16):
        super().__init__()
        self.gates = nn.ModuleList(ChannelGate(c, reduction) for c in channels)

    def forward(self, features: list[torch.Tensor], siam_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features, siam_features: lists of [N, C_l, H_l, W_l] -> same shapes."""
        return [f + gate(g) * g for f, g, gate in zip(features, siam_features, self.gates, strict=True)]
