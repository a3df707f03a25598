"""Inputs of the deformable-attention tests (tests/test_model_ops_deform_attn.py, tests/test_model_ops_build.py)."""

from __future__ import annotations

import torch


def make_inputs(shapes=((8, 4), (4, 8), (2, 2), (1, 1)), batch=2, queries=9, heads=3, dim=32, points=3,
                dtype=torch.float32, borders=False, seed=0):
    """Random inputs with levels of unequal sizes and locations in [-0.3, 1.3]. ``borders``: a third of the
    coordinates sit exactly on cell borders (x * w - 0.5 an integer from -1 to w, exact in binary because the
    sizes are powers of two), plus exact 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, dim, generator=g, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if borders:
        for level, (h, w) in enumerate(shapes):
            for axis, side in ((0, w), (1, h)):
                exact = torch.tensor([(k + 0.5) / side for k in range(-1, side + 1)] + [0.0, 1.0], dtype=torch.float64)
                target = locations[:, :, :, level, :, axis]
                pick = torch.rand(target.shape, generator=g) < 0.35
                choice = exact[torch.randint(len(exact), target.shape, generator=g)]
                target[pick] = choice[pick]
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=torch.float64)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32  # locations and weights
    return value.to(dtype), spatial_shapes, level_start, locations.to(accumulation), weights.to(accumulation)
