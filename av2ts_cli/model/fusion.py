"""Downsampling and one-stream audio-visual attention (OSA, docs/model.md, 'Downsampling and OSA').

The stride-4 mask features are folded 4x4 into channels (space-to-depth, channel index c*16 + dy*4 + dx) and
projected back to the hidden width by a 1x1 conv. The resulting stride-16 visual tokens and the audio queries are
layer-normalised, given position embeddings, concatenated into one sequence and run through a few transformer
blocks; each stream then takes a layer-scaled residual (scale initialised to 1e-4) on its normalised input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.model.blocks import TransformerBlock, sine_position_embedding


class OneStreamFusion(nn.Module):
    """(mask features [N, C, H, W], audio queries [N, Q, C]) -> (visual [N, C, H/4, W/4], audio [N, Q, C])."""

    def __init__(self, dim: int, num_queries: int, num_blocks: int = 3, num_heads: int = 8,
                 layer_scale_init: float = 1e-4):
        super().__init__()
        self.reduce = nn.Conv2d(dim * 16, dim, kernel_size=1)
        self.level_embed = nn.Embedding(1, dim)
        self.audio_pos = nn.Embedding(num_queries, dim)
        self.norm_visual = nn.LayerNorm(dim)
        self.norm_audio = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.gamma_visual = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma_audio = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, mask_features: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mask_features: [N, C, H, W] (H, W multiples of 4); audio: [N, Q, C] -> ([N, C, H/4, W/4], [N, Q, C])."""
        x = self.reduce(F.pixel_unshuffle(mask_features, 4))  # [N, C, H/4, W/4]
        n, c, h, w = x.shape
        pos_v = sine_position_embedding(h, w, c, x.device).flatten(1).t().to(x.dtype)  # [h*w, C]
        v = self.norm_visual(x.flatten(2).transpose(1, 2) + self.level_embed.weight)  # [N, h*w, C]
        a = self.norm_audio(audio)
        z = torch.cat([v + pos_v, a + self.audio_pos.weight], dim=1)
        for block in self.blocks:
            z = block(z)
        delta_v, delta_a = self.norm(z).split([h * w, a.shape[1]], dim=1)
        v = v + self.gamma_visual * delta_v
        a = a + self.gamma_audio * delta_a
        return v.transpose(1, 2).reshape(n, c, h, w), a
