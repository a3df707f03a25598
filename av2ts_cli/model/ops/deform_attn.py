"""Multi-scale deformable attention (Deformable-DETR semantics): the op, its autograd, the pure-PyTorch fallback.

``ms_deform_attn`` runs the compiled kernel of the tensors' device or the fallback ``ms_deform_attn_torch``, as
``build.backend_for`` decides from ``AV2TS_DEFORM_ATTN`` (the backend choice and the JIT build live in
``build.py``). Sampling locations, attention weights and accumulation stay float32 whatever the value dtype (bf16
locations would be off by a quarter pixel at 64 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from av2ts_cli.model.ops import build

KERNEL_DTYPES = {"cpp": (torch.float32, torch.float64, torch.bfloat16),
                 "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (the fallback and the test oracle).

    value: [N, S, H, D] with S = sum(h_l * w_l); spatial_shapes: [L, 2] (h, w); level_start_index: [L];
    sampling_locations: [N, Q, H, L, P, 2] as (x, y) in [0, 1]; attention_weights: [N, Q, H, L, P].
    Returns [N, Q, H*D] in value's dtype. Bilinear, zero padding, align_corners=False; half-precision values are
    sampled in float32, like the kernels do. A sample whose pixel position ``loc * size - 0.5`` is at or beyond -1
    or at or beyond ``size`` is dropped, as the Deformable-DETR CUDA kernel (and av2ts's kernels) drop it: its value
    is 0 there anyway, but ``grid_sample`` would still give it a location gradient at exactly -1.
    """
    n, _, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
    # [N, S, H, D] -> [N*H, D, S]: each level is then a [N*H, D, h, w] view for grid_sample
    planes = value.to(dtype).permute(0, 2, 3, 1).reshape(n * heads, dim, -1)
    # level-major, so each level's grid and weights are contiguous: [L, N*H, Q, P, 2] and [L, N*H, Q, P, 1]
    grids = (2 * sampling_locations.to(dtype) - 1).permute(3, 0, 2, 1, 4, 5).reshape(levels, n * heads, q, points, 2)
    weights = attention_weights.to(dtype).permute(3, 0, 2, 1, 4).reshape(levels, n * heads, q, points, 1)
    sizes = spatial_shapes.to(device=value.device, dtype=dtype).flip(-1)  # [L, 2] as (w, h), like the locations
    with torch.no_grad():  # a step function of the locations: no gradient of its own
        position = sampling_locations.to(dtype) * sizes.view(1, 1, 1, levels, 1, 2) - 0.5
        inside = ((position > -1) & (position < sizes.view(1, 1, 1, levels, 1, 2))).all(-1)  # [N, Q, H, L, P]
        inside = inside.permute(3, 0, 2, 1, 4).reshape(levels, n * heads, q, points, 1)
    weights = weights * inside
    out = None
    for level, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist(), strict=True)):
        plane = planes[:, :, start:start + h * w].view(n * heads, dim, h, w)
        sampled = F.grid_sample(plane, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False)
        term = torch.matmul(sampled.transpose(1, 2), weights[level])  # [N*H, Q, D, 1]: weighted sum over points
        out = term if out is None else out + term
    return out.view(n, heads, q, dim).transpose(1, 2).reshape(n, q, heads * dim).to(value.dtype)


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.ops = ops
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return ops.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.ops.backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous())
        return None, grad_value, None, None, grad_locations, grad_weights


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention through the active backend (shapes: see ``ms_deform_attn_torch``)."""
    backend, ops = build.backend_for(value.device.type)
    if backend == "torch" or (backend == "cuda" and value.dtype == torch.float64):  # no fp64 CUDA kernel
        return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    if value.dtype not in KERNEL_DTYPES[backend]:  # e.g. float16 on CPU: compute in float32
        value = value.float()
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.long)
    level_start_index = level_start_index.to(device=value.device, dtype=torch.long)
    sampling_locations, attention_weights = sampling_locations.to(acc), attention_weights.to(acc)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        out = _MSDeformAttnFunction.apply(ops, *args)
    else:
        out = ops.forward(*args)
    return out.to(out_dtype)
