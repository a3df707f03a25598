"""Multi-scale deformable attention (Deformable-DETR semantics).

Placeholder: only the pure-PyTorch path exists so far. Issue #3 adds the C++/CUDA kernels, the JIT loader and the
backend choice behind the same ``ms_deform_attn`` signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (the test oracle and the fallback).

    value: [N, S, H, D] with S = sum(h_l * w_l); spatial_shapes: [L, 2] (h, w); level_start_index: [L];
    sampling_locations: [N, Q, H, L, P, 2] as (x, y) in [0, 1]; attention_weights: [N, Q, H, L, P].
    Returns [N, Q, H*D]. Bilinear, zero padding, align_corners=False.
    """
    n, _, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, h*w, H, D] -> [N*H, D, h, w]
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(n * heads, dim, h, w)
        # [N, Q, H, P, 2] -> [N*H, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*H, D, Q, L*P] weighted by [N*H, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, heads * dim, q).transpose(1, 2).contiguous()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention through the active backend (see ``ms_deform_attn_torch`` for shapes)."""
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def active_backend() -> str:
    return "torch"
