"""Building blocks shared by several parts of AV2TS: the pre-norm transformer block (CED, DSTA, OSA), its MLP,
the sine position encoding (pixel decoder, OSA, decoder) and detectron2-style frozen BatchNorm (backbone, CED).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (CED's ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [N, L, C] -> (out [N, L, C], raw q·kᵀ logits [N, heads, L, L] before scaling, or None)."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_logits:  # DSTA shares these logits with the visual side, so compute them explicitly
            logits = q @ k.transpose(-2, -1)
            attn = (logits * (dim // self.num_heads) ** -0.5).softmax(dim=-1)
            out = attn @ v
        else:
            logits = None
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim)), logits


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (CED's ``Block``: no layer scale,
    no drop path). CED uses LayerNorm eps 1e-6 and a qkv bias; DSTA and OSA use eps 1e-5 and no qkv bias."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """x: [N, L, C] -> [N, L, C]; with ``return_logits`` also the raw attention logits [N, heads, L, L]."""
        out, logits = self.attn(self.norm1(x), return_logits)
        x = x + out
        x = x + self.mlp(self.norm2(x))
        return (x, logits) if return_logits else x


def sine_position_embedding(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """DETR/Mask2Former sine encoding (normalised, scale 2π, temperature 10000) of an unpadded map -> [dim, h, w].

    The first dim/2 channels encode y, the rest x; within each half, sin and cos alternate.
    """
    half = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    dim_t = 10000 ** (2 * (torch.arange(half, dtype=torch.float32, device=device) // 2) / half)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [n] -> [n, half], interleaved sin/cos
        p = pos[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine (detectron2's FrozenBN): all four tensors are buffers.

    The folded scale and shift follow the input's dtype so that bf16 autocast stays in bf16.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> [N, C, H, W]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a plain BatchNorm's counter has no meaning here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` (or ``module`` itself) by a FrozenBatchNorm2d holding its
    current statistics and affine parameters; returns the converted module."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        converted = freeze_batch_norm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
