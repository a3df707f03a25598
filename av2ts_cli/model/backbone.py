"""Visual backbones (timm) and the Siam-encoder gates.

The backbone returns four feature maps at strides 4, 8, 16, 32 (res2..res5 in detectron2 terms). ResNet-50 keeps
detectron2's FrozenBN (statistics and affine fixed, convolutions trained); PVT-v2-b5 has LayerNorms only; a Swin
Transformer (VCT) is wrapped as Mask2Former's D2SwinTransformer uses it (``SwinFeatures``). The Siam
encoder is a second backbone of the same architecture with its own weights, run on the maskiges; its features are
added to the frame features through squeeze-and-excitation gates: ``F_l += SE_l(G_l) * G_l`` (docs/model.md, 'Siam
encoder').
"""

from __future__ import annotations

import timm
import torch
from timm.layers import DropPath
from timm.models import FeatureInfo
from torch import nn

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.blocks import freeze_batch_norm


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm ``features_only`` model (random init, no download): [N, 3, H, W] -> list of 4 maps, strides 4..32.
    timm Swin models (names ``swin_*``) become a ``SwinFeatures`` instead."""
    if cfg.backbone.startswith("swin_"):
        model = SwinFeatures(cfg.backbone, **cfg.backbone_kwargs)
    else:
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


class SwinFeatures(nn.Module):
    """A timm Swin Transformer as Mask2Former's ``D2SwinTransformer`` (VCT's backbone): [N, 3, H, W] -> the four
    stage outputs [N, C_l, H/s, W/s], s = 4..32, each taken *before* the patch merging that follows it and put
    through its own LayerNorm.

    The reference merges patches at the end of a stage, timm at the start of the next one, so timm's stage outputs
    are exactly the reference's pre-merging outputs. The reference normalises them with ``norm0..norm3``: here
    ``stage_norms.{0,1,2}`` (extra LayerNorms) and timm's final ``norm`` for the last stage. The parts of the timm
    model are held directly (``patch_embed``, ``layers``, ``norm``; its empty classifier head is dropped), so the
    state-dict keys are timm's. ``always_partition=True`` by default: the reference also shifts and masks windows
    in a stage whose map is no larger than the window (stage 4 at 384 px: 12x12 with window 12), which timm's
    default switches off (its res5 then differs). Drop path: pass 0 here and set it with the linear rule of
    ``create_backbone`` (the reference's, over all 24 blocks; timm's own is stage-wise).
    """

    def __init__(self, name: str, **kwargs):
        super().__init__()
        kwargs = {"always_partition": True, "drop_path_rate": 0.0, **kwargs}
        swin = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        self.patch_embed, self.layers, self.norm = swin.patch_embed, swin.layers, swin.norm
        channels = [info["num_chs"] for info in swin.feature_info]
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels[:-1])
        self.feature_info = FeatureInfo(swin.feature_info, out_indices=tuple(range(len(channels))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [N, 3, H, W] -> 4 maps [N, C_l, H/s, W/s] (NCHW; timm's stages run NHWC)."""
        x = self.patch_embed(x)  # [N, H/4, W/4, C]
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            norm = self.stage_norms[i] if i < len(self.stage_norms) else self.norm
            outs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outs


def backbone_channels(backbone: nn.Module) -> list[int]:
    """Channels of the four feature maps of a ``create_backbone`` model."""
    return list(backbone.feature_info.channels())


def _set_linear_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks in order (the PVT-v2 rule; timm's own
    rule is stage-wise)."""
    blocks = [m for m in model.modules() if hasattr(m, "drop_path1") and hasattr(m, "drop_path2")]
    for block, p in zip(blocks, torch.linspace(0, rate, len(blocks), device="cpu").tolist(), strict=True):
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
