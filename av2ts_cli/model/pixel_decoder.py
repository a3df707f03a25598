"""Pixel decoder: multi-scale deformable attention encoder on strides 32/16/8 and an FPN step to stride 4
(Mask2Former's MSDeformAttnPixelDecoder as AV2TS uses it, docs/model.md, 'Pixel decoder').

The inputs are already at the hidden width (TVA projected them), so there is no input projection. Deliberately
absent, although the reference builds them: ``input_proj`` (per-level 1x1 conv + GroupNorm, bypassed by AV2TS)
and ``linear1`` (a 4096 -> 256 1x1 conv, never called). The decoder runs with autocast disabled in its weights'
dtype: fp32 in training, as the reference does, and bf16 in a model cast for inference (model/inference.py: the
whole forward in bf16). The deformable-attention sampling locations and attention weights are fp32 either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.model.blocks import sine_position_embedding
from av2ts_cli.model.ops import ms_deform_attn


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable-DETR's MSDeformAttn): each query samples ``num_points`` points
    per head and level around its reference point, weighted by a softmax over levels x points."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # offsets start on a ring of directions, one per head, at distances 1..P (Deformable-DETR's init)
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> torch.Tensor:
        """query: [N, Q, C]; reference_points: [1, Q, 2] (x, y) in [0, 1]; value: [N, S, C] (levels flattened);
        spatial_shapes: [L, 2] (h, w) int64; level_start_index: [L] -> [N, Q, C]."""
        n, q, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(n, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(n, q, heads, levels, points, 2)
        weights = _softmax_last(self.attention_weights(query).view(n, q, heads, levels * points).float())
        # fp32 whatever the weights' dtype: bf16 locations would be off by a quarter pixel at 64 px
        offsets = offsets.float()
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (w, h) per level
        locations = reference_points[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights.view(n, q, heads, levels, points))
        return self.output_proj(out)


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``x`` [..., L*P]. On the CPU without autograd, in whole-tensor ops in
    place: PyTorch's CPU softmax goes row by row, slow for rows this short (12 weights: 4.3 ms for av2ts-r50's
    [5, 1029, 8, 12] at 224 px against 0.9 ms, six times per forward; the results differ by at most 4e-7)."""
    if x.device.type != "cpu" or x.requires_grad:  # (False under no_grad and inference_mode)
        return x.softmax(-1)
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention (query = src + pos) -> norm1 -> ReLU FFN -> norm2."""

    def __init__(self, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.attn = DeformableAttention(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        """src, pos: [N, S, C] -> [N, S, C]."""
        src = self.norm1(src + self.attn(src + pos, reference_points, src, spatial_shapes, level_start_index))
        return self.norm2(src + self.fc2(F.relu(self.fc1(src))))


class ConvGroupNorm(nn.Module):
    """Conv (no bias) -> GroupNorm(32) [-> ReLU] (detectron2's Conv2d with a norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_channels)
        self.relu = relu
        nn.init.kaiming_uniform_(self.conv.weight, a=1)  # c2_xavier_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
    """Features [res2, res3, res4, res5] ([N, C, H/s, W/s], s = 4..32) -> (mask features [N, C, H/4, W/4],
    multi-scale memories [res5, res4, res3] encoded, i.e. strides 32, 16, 8)."""

    def __init__(self, dim: int = 256, num_layers: int = 6, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 1024, num_levels: int = 3, in_channels: list[int] | None = None):
        """``in_channels``: the backbone's native widths [res2..res5] for the standard Mask2Former decoder (COMBO):
        1x1 conv + GroupNorm input projections on res3..res5 and the lateral conv from res2's width. None: the
        inputs are already ``dim`` wide and there are no input projections (AV2TS)."""
        super().__init__()
        self.num_levels = num_levels
        if in_channels is not None:  # res5, res4, res3 order, like the levels they project
            self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim))
                                            for c in in_channels[1:][::-1])
            for proj in self.input_proj:
                nn.init.xavier_uniform_(proj[0].weight)
                nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn_dim, num_levels, num_heads, num_points) for _ in range(num_layers))
        self.lateral = ConvGroupNorm(dim if in_channels is None else in_channels[0], dim, 1)
        self.output = ConvGroupNorm(dim, dim, 3, relu=True)
        self.mask_projection = nn.Conv2d(dim, dim, kernel_size=1)
        # Mask2Former's init: xavier on every matrix of the encoder, then the deformable-attention init
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.kaiming_uniform_(self.mask_projection.weight, a=1)
        nn.init.zeros_(self.mask_projection.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features: [res2..res5], [N, C_l, H/s, W/s] -> (mask features [N, C, H/4, W/4], memories [N, C, h, w]
        at strides 32, 16, 8), in the weights' dtype."""
        dtype = self.level_embed.dtype
        with torch.autocast(features[0].device.type, enabled=False):
            return self._forward([f.to(dtype) for f in features])

    def _forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, device = features[0].shape[0], features[0].device
        levels = features[1:][::-1]  # res5, res4, res3: low to high resolution
        if hasattr(self, "input_proj"):
            levels = [proj(f) for proj, f in zip(self.input_proj, levels, strict=True)]
        dim = levels[0].shape[1]
        shapes = [tuple(f.shape[-2:]) for f in levels]
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], dim=1)  # [N, S, C]
        pos = torch.cat([sine_position_embedding(h, w, dim, device).flatten(1).t() + self.level_embed[i]
                         for i, (h, w) in enumerate(shapes)], dim=0)[None].to(src.dtype)  # [1, S, C]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        reference_points = torch.cat([_cell_centres(h, w, device) for h, w in shapes], dim=0)[None]  # [1, S, 2]
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        memories = [z.transpose(1, 2).reshape(n, dim, h, w)
                    for z, (h, w) in zip(src.split(sizes.tolist(), dim=1), shapes, strict=True)]
        fine = self.lateral(features[0])
        fine = fine + F.interpolate(memories[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_projection(self.output(fine)), memories


def _cell_centres(h: int, w: int, device) -> torch.Tensor:
    """[h*w, 2] (x, y) of the cell centres of an h x w map, normalised to [0, 1], row-major."""
    y, x = torch.meshgrid((torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                          (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)
