"""The deformable-attention kernels at exact pixel centres, where bilinear sampling has a kink.

The reference trains with the Deformable-DETR CUDA kernel. It computes the pixel position ``x = loc_x * w - 0.5`` as
one fused multiply-add, so it is rounded once (in fp32 for fp32 locations). It takes ``x0 = floor(x)`` and counts a
sample only where ``-1 < x < w`` and ``-1 < y < h``. So at an integer ``x`` its location gradient is the right-hand
derivative, the slope of cell ``[x, x + 1]``. ``oracle`` below is that arithmetic in float64, from positions rounded
the way the kernel rounds them. The av2ts kernels' output and all three gradients must equal it. The inputs are laid
out the way the reference initialises the sampling offsets (pixel-centre reference points plus whole-pixel
offsets), so a large share of the coordinates are integers (docs/model.md, "Training fidelity").
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from av2ts_cli.model.ops import load_kernel, ms_deform_attn_torch

# (h, w) per level: powers of two, where pixel centres are exact in binary, and sizes where they are not
SHAPES = ((8, 8), (7, 5), (4, 6), (3, 3))
HEADS, POINTS = 8, 4


def level_starts(shapes) -> torch.Tensor:
    """[L] int64: where each level starts in the flattened value sequence."""
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def init_like_locations(shapes, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, Q, M, L, P, 2] (x, y) sampling locations in ``dtype``, computed in it, laid out the way the reference
    initialises them.

    Every pixel of every level is a query, and its reference point is its pixel centre ((i + 0.5) / w).
    Head m's point p sits (p + 1) pixels away in direction m: unit-max directions at multiples of 2 pi / M, the
    sampling-offset bias of Deformable-DETR's MSDeformAttn, divided by each level's size. So at a query's own level
    the coordinates are integers, up to the rounding of the centre, the division and the cos/sin values.
    """
    centres = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=dtype) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=dtype) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    reference = torch.cat(centres)  # [Q, 2]
    theta = torch.arange(HEADS, dtype=dtype) * (2.0 * math.pi / HEADS)
    directions = torch.stack([theta.cos(), theta.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True)[0]  # [M, 2]
    offsets = directions[:, None, :] * torch.arange(1, POINTS + 1, dtype=dtype)[:, None]  # [M, P, 2]
    normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=dtype)  # [L, 2]
    locations = reference[:, None, None, None, :] + offsets[None, :, None] / normaliser[None, None, :, None, :]
    return locations.expand(batch, *locations.shape).contiguous()


def sizes_like(locations: torch.Tensor, shapes) -> torch.Tensor:
    """[..., L, P, 2] int64: the (w, h) of each coordinate's level, for locations [..., L, P, 2]."""
    wh = torch.tensor([[w, h] for h, w in shapes])[:, None, :]
    return wh.expand(locations.shape)


def fused_positions(locations: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``loc * size - 0.5`` rounded once to the dtype of ``locations`` (float32 or float64), as a fused
    multiply-add rounds it, returned as float64. locations: any shape; sizes: int64 of the same shape."""
    out = []
    for loc, size in zip(locations.double().reshape(-1).tolist(), sizes.reshape(-1).tolist(), strict=True):
        exact = Fraction(loc) * size - Fraction(1, 2)
        nearest_double = float(exact)  # correctly rounded
        if locations.dtype == torch.float32:
            # rounding to float64 first would round twice; float32 locations times a small size stay exact in
            # float64, so the float32 rounding below is the only one (checked, not assumed)
            assert Fraction(nearest_double) == exact, f"{loc} * {size} - 0.5 is not exact in float64"
            nearest_double = float(np.float32(nearest_double))
        out.append(nearest_double)
    return torch.tensor(out, dtype=torch.float64).view(locations.shape)


def two_rounding_positions(locations: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``loc * size`` rounded, then ``- 0.5`` rounded (what an unfused multiply and subtraction give), as float64."""
    return (locations * sizes.to(locations.dtype) - 0.5).double()


def oracle(value, shapes, weights, grad_output, positions, side: str = "right"):
    """Deformable-DETR's bilinear sampling and its gradient formula, in float64.

    value [N, S, M, D]; weights [N, Q, M, L, P]; grad_output [N, Q, M*D]; positions [N, Q, M, L, P, 2] pixel
    coordinates (x, y) as the kernel computes them. ``side="right"`` takes x0 = floor(x), the reference's choice; at
    an integer x the sample is then on the left edge of cell [x, x + 1] and the location gradient is that cell's
    slope. ``side="left"`` takes x0 = ceil(x) - 1, so the cell is [x - 1, x]. It exists to show that the test tells
    the two sides apart. Returns (output [N, Q, M*D], grad_value [N, S, M, D], grad_locations [N, Q, M, L, P, 2],
    grad_weights [N, Q, M, L, P]), all float64.
    """
    value, weights, positions = value.double(), weights.double(), positions.double()
    n, _, heads, dim = value.shape
    queries = weights.shape[1]
    go = grad_output.double().view(n, queries, heads, dim)
    out = torch.zeros(n, queries, heads, dim, dtype=torch.float64)
    grad_value = torch.zeros_like(value)
    grad_locations = torch.zeros_like(positions)
    grad_weights = torch.zeros_like(weights)
    batch_index = torch.arange(n).view(n, 1, 1, 1)
    head_index = torch.arange(heads).view(1, 1, heads, 1)
    start = 0
    for level, (h, w) in enumerate(shapes):
        x, y = positions[:, :, :, level, :, 0], positions[:, :, :, level, :, 1]  # [N, Q, M, P]
        a = weights[:, :, :, level]
        counts = (x > -1) & (x < w) & (y > -1) & (y < h)  # the reference's test: other samples add nothing
        x0 = x.floor() if side == "right" else x.ceil() - 1
        y0 = y.floor() if side == "right" else y.ceil() - 1
        lx, ly = x - x0, y - y0
        hx, hy = 1 - lx, 1 - ly
        corner_values, corner_weights = [], []
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):  # (y0, x0), (y0, x1), (y1, x0), (y1, x1)
            cx, cy = x0 + dx, y0 + dy
            inside = counts & (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)  # zero padding outside the map
            flat = torch.where(inside, start + cy * w + cx, 0).long()  # [N, Q, M, P]; row 0 stands in outside
            corner = value[batch_index, flat, head_index] * inside[..., None]  # [N, Q, M, P, D]
            bilinear = (ly if dy else hy) * (lx if dx else hx)
            corner_values.append(corner)
            corner_weights.append(bilinear)
            out += (a * bilinear)[..., None].mul(corner).sum(3)
            contribution = (a * bilinear * inside)[..., None] * go[:, :, :, None, :]
            grad_value.index_put_((batch_index.expand_as(flat), flat, head_index.expand_as(flat)), contribution,
                                  accumulate=True)
        g = [(go[:, :, :, None, :] * corner).sum(-1) for corner in corner_values]  # grad_out . corner row
        grad_weights[:, :, :, level] = sum(cw * gc for cw, gc in zip(corner_weights, g, strict=True))
        grad_locations[:, :, :, level, :, 0] = a * w * (hy * (g[1] - g[0]) + ly * (g[3] - g[2]))
        grad_locations[:, :, :, level, :, 1] = a * h * (hx * (g[2] - g[0]) + lx * (g[3] - g[1]))
        start += h * w
    return out.view(n, queries, heads * dim), grad_value, grad_locations, grad_weights


def make_inputs(dtype: torch.dtype, dim: int, locations: torch.Tensor, seed: int = 0):
    """(value [N, S, M, D] in ``dtype``, weights [N, Q, M, L, P], grad_output [N, Q, M*D] in ``dtype``), random;
    locations and weights use the accumulation type (float64 for float64 values, else float32)."""
    g = torch.Generator().manual_seed(seed)
    n, queries = locations.shape[:2]
    total = sum(h * w for h, w in SHAPES)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(n, total, HEADS, dim, generator=g, dtype=torch.float64).to(dtype)
    weights = torch.rand(n, queries, HEADS, len(SHAPES), POINTS, generator=g, dtype=torch.float64).to(accumulation)
    grad_output = torch.randn(n, queries, HEADS * dim, generator=g, dtype=torch.float64).to(dtype)
    return value, weights, grad_output


def kernel_results(ops, device: str, value, weights, grad_output, locations):
    """The kernel's (output, grad_value, grad_locations, grad_weights) on ``device``, moved back to the CPU."""
    shapes = torch.tensor(SHAPES, device=device)
    starts = level_starts(SHAPES).to(device)
    args = [t.to(device) for t in (value, locations, weights)]
    out = ops.forward(args[0], shapes, starts, args[1], args[2])
    grads = ops.backward(args[0], shapes, starts, args[1], args[2], grad_output.to(device))
    return [t.cpu() for t in (out, *grads)]


def assert_matches_oracle(ops, device: str, dtype: torch.dtype, dim: int) -> None:
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    locations = init_like_locations(SHAPES, batch=2, dtype=accumulation)
    value, weights, grad_output = make_inputs(dtype, dim, locations, seed=dim)
    sizes = sizes_like(locations, SHAPES)
    positions = fused_positions(locations[:1], sizes[:1]).expand_as(locations)  # the batch repeats its locations

    # the inputs exercise the kinks: many integer coordinates, including -1 (dropped by the reference's test) and
    # w - 1 (whose right-hand neighbour is the zero padding)
    integer = positions == positions.floor()
    assert integer.double().mean() > 0.15
    assert (positions == -1).any() and (positions == sizes - 1).any()
    expected = oracle(value, SHAPES, weights, grad_output, positions)
    other_side = oracle(value, SHAPES, weights, grad_output, positions, side="left")
    assert (expected[2] - other_side[2]).abs().max() > 1  # the two one-sided derivatives differ by far more than
    #                                                       the tolerances below
    if dtype == torch.float64:  # and the rounding: an unfused multiply and subtraction put 1% of the coordinates
        # in another cell. In fp32 they do so here only at -1 (dropped either way): this test cannot tell them apart.
        two_roundings = oracle(value, SHAPES, weights, grad_output, two_rounding_positions(locations, sizes))
        assert (expected[2] - two_roundings[2]).abs().max() > 1

    got = kernel_results(ops, device, value, weights, grad_output, locations)
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, actual, wanted in zip(names, got, expected, strict=True):
        # float32 accumulation: relative 1e-5 of the largest entry; bf16 rounds output and grad_value to 8 bits
        coarse = dtype == torch.bfloat16 and name in ("output", "grad_value")
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2 if coarse else 1e-5}[dtype]
        scale = wanted.abs().max().item()
        torch.testing.assert_close(actual.double(), wanted, rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dim", [32, 5])  # two float32 SIMD vectors per head (the model's), scalar channels only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_kernel_at_pixel_centres_is_deformable_detr(cpp_kernel, dtype, dim):
    assert_matches_oracle(cpp_kernel, "cpu", dtype, dim)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dim", [32, 20])  # shuffle-reduced heads, atomics per channel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_at_pixel_centres_is_deformable_detr(dtype, dim):
    assert_matches_oracle(load_kernel("cuda"), "cuda", dtype, dim)


def test_oracle_is_the_pytorch_op_away_from_integer_positions():
    # the oracle checked against an independent implementation (grid_sample's forward and autograd) where bilinear
    # sampling is smooth, so it is not the kernel's own formula checked against itself
    g = torch.Generator().manual_seed(1)
    locations = torch.rand(2, 11, HEADS, len(SHAPES), POINTS, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    value, weights, grad_output = make_inputs(torch.float64, 6, locations, seed=2)
    positions = fused_positions(locations, sizes_like(locations, SHAPES))
    assert (positions != positions.floor()).all()
    expected = oracle(value, SHAPES, weights, grad_output, positions)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn_torch(leaves[0], torch.tensor(SHAPES), level_starts(SHAPES), leaves[1], leaves[2])
    out.backward(grad_output)
    for actual, wanted in zip((out, *(leaf.grad for leaf in leaves)), expected, strict=True):
        torch.testing.assert_close(actual.detach(), wanted, rtol=1e-10, atol=1e-10)
