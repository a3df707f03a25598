"""DSTA: temporal acoustic attention (TAA) and temporal visual attention (TVA) with a shared map (docs/model.md,
'DSTA: temporal attention').

TAA runs three transformer blocks over time, separately for each of the 24 audio tokens of a frame. The last
block also returns its raw q·kᵀ logits; their mean over the 24 tokens is the one temporal attention map of the
clip. TVA projects each backbone level to the hidden width and mixes every pixel's T-long series with that map
(softmax of the shared logits times its own values): the visual side has no query or key projection.
"""

from __future__ import annotations

import torch
from torch import nn

from av2ts_cli.model.blocks import Mlp, TransformerBlock


class TemporalAcousticAttention(nn.Module):
    """Audio tokens [B*T, P, C] -> (audio queries [B*T, 4P, hidden], shared logits [B, heads, T, T]).

    The 4P audio queries are, in order: proj1(CED tokens), proj2(norm1 of block 2's input), proj3(norm1 of block
    3's input), proj4(final LayerNorm of block 3's output) (the reference's ``audio_linear1..4``).
    """

    def __init__(self, dim: int, hidden_dim: int, num_heads: int = 8, num_blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.projections = nn.ModuleList(nn.Linear(dim, hidden_dim) for _ in range(num_blocks + 1))

    def forward(self, tokens: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [B*T, P, C] frame-major -> ([B*T, 4P, hidden], logits [B, heads, T, T])."""
        bt, p, c = tokens.shape
        b, t = bt // num_frames, num_frames

        def to_series(x):  # [B*T, P, C] -> [B*P, T, C]
            return x.reshape(b, t, p, c).transpose(1, 2).reshape(b * p, t, c)

        def to_frames(x):  # [B*P, T, C] -> [B*T, P, C]
            return x.reshape(b, p, t, c).transpose(1, 2).reshape(bt, p, c)

        stages = [tokens]
        x = to_series(tokens)
        logits = None
        for i, block in enumerate(self.blocks):
            if i > 0:
                stages.append(to_frames(block.norm1(x)))  # the block's normalised input
            if i == len(self.blocks) - 1:
                x, logits = block(x, return_logits=True)
            else:
                x = block(x)
        stages.append(to_frames(self.norm(x)))
        queries = torch.cat([proj(s) for proj, s in zip(self.projections, stages, strict=True)], dim=1)
        shared = logits.reshape(b, p, *logits.shape[1:]).mean(dim=1)  # average the raw logits over audio tokens
        return queries, shared


class SharedMapAttention(nn.Module):
    """Attention whose weights come from outside: ``proj(softmax(logits * d^-0.5) @ v(x))`` per head."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [B, S, T, C] (S series per clip); weights: [B, heads, T, T] softmax-ed -> [B, S, T, C]."""
        b, s, t, c = x.shape
        v = self.v(x).reshape(b, s, t, self.num_heads, c // self.num_heads).transpose(2, 3)  # [B, S, heads, T, d]
        out = weights.unsqueeze(1).to(v.dtype) @ v  # one map per clip, broadcast over the S series
        return self.proj(out.transpose(2, 3).reshape(b, s, t, c))


class TemporalVisualBlock(nn.Module):
    """Pre-norm block with SharedMapAttention: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SharedMapAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [B, S, T, C]; weights: [B, heads, T, T] -> [B, S, T, C]."""
        x = x + self.attn(self.norm1(x), weights)
        return x + self.mlp(self.norm2(x))


class TemporalVisualAttention(nn.Module):
    """Per level: 1x1 conv + GroupNorm(32) to the hidden width, TemporalVisualBlock over time, LayerNorm."""

    def __init__(self, in_channels: list[int], hidden_dim: int, num_heads: int = 8):
        super().__init__()
        self.head_dim = hidden_dim // num_heads
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels)
        self.blocks = nn.ModuleList(TemporalVisualBlock(hidden_dim, num_heads) for _ in in_channels)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in in_channels)

    def forward(self, features: list[torch.Tensor], logits: torch.Tensor) -> list[torch.Tensor]:
        """features: per level [B*T, C_l, h, w]; logits: shared [B, heads, T, T] -> per level [B*T, hidden, h, w]
        (channels_last memory: the pixel decoder flattens them to tokens for free)."""
        b, _, t, _ = logits.shape
        weights = (logits.float() * self.head_dim**-0.5).softmax(dim=-1)
        out = []
        for feature, project, block, norm in zip(features, self.projections, self.blocks, self.norms, strict=True):
            x = project(feature)
            _, c, h, w = x.shape
            x = x.reshape(b, t, c, h * w).permute(0, 3, 1, 2)  # [B, h*w, T, C]: one series per pixel
            x = norm(block(x, weights))
            x = x.reshape(b, h, w, t, c).permute(0, 3, 1, 2, 4).reshape(b * t, h, w, c)
            out.append(x.permute(0, 3, 1, 2))
        return out
