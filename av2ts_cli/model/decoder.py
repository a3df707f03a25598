"""Masked-attention transformer decoder with class and mask heads (Mask2Former's decoder as AV2TS modifies it,
docs/model.md, 'Transformer decoder').

Each query is a learnt embedding plus its own fused audio token. Layer i cross-attends to memory level i % 4:
the pixel decoder's strides 32, 16, 8, then the OSA visual map, each with a sine position encoding and a level
embedding. Cross-attention is masked by the previous prediction (pixels whose mask probability is below 0.5 are
hidden; a query that would see nothing sees everything). Layers are post-norm: cross-attention, self-attention,
FFN. The heads run on the initial queries and after every layer; masks are dot products with the (unfused)
mask features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.model.blocks import sine_position_embedding


class MultiHeadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (``in_proj_weight`` [3C, C], ``in_proj_bias``, ``out_proj``) computed with
    ``scaled_dot_product_attention``: the same result, and under CPU bf16 autocast several times faster than
    nn.MultiheadAttention with a boolean mask. Batch-first."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                visible: torch.Tensor | None = None) -> torch.Tensor:
        """query: [N, L, C]; key, value: [N, S, C]; visible: bool [N, 1, L, S], True = may attend -> [N, L, C]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        n, length, dim = query.shape

        def heads(x, w, b):  # [N, len, C] -> [N, heads, len, C/heads]
            return F.linear(x, w, b).view(n, x.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv),
                                             attn_mask=visible)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> ReLU FFN, each followed by residual and LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.cross_attn = MultiHeadAttention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.self_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        for p in self.parameters():  # Mask2Former's init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x, query_pos, memory, memory_pos, visible):
        """x, query_pos: [N, Q, C]; memory: [N, S, C]; memory_pos: [S, C]; visible: bool [N, 1, Q, S], True = the
        query may attend to that memory position -> [N, Q, C]."""
        x = self.cross_norm(x + self.cross_attn(x + query_pos, memory + memory_pos, memory, visible))
        q = x + query_pos
        x = self.self_norm(x + self.self_attn(q, q, x))
        return self.ffn_norm(x + self.fc2(F.relu(self.fc1(x))))


class MaskMlp(nn.Module):
    """Three linear layers with ReLU between them (the mask embedding head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """(memories [32, 16, 8 strides, OSA map], audio queries [N, Q, C], mask features [N, C, H/4, W/4]) ->
    {"pred_logits" [N, Q, K+1], "pred_masks" [N, Q, H/4, W/4], "aux_outputs", "middle_masks"}."""

    def __init__(self, dim: int, num_classes: int, num_queries: int, num_layers: int = 12, num_heads: int = 8,
                 ffn_dim: int = 2048, num_memory_levels: int = 4, unmasked_levels: tuple[int, ...] = ()):
        """``num_memory_levels``: 4 for AV2TS (3 pixel-decoder scales + the OSA map), 3 for COMBO (the scales), 4 for
        VCT (the audio tokens + the scales). ``unmasked_levels``: memory levels that every query sees whole (no
        masked attention: VCT's audio tokens, level 0, which are no image grid)."""
        super().__init__()
        self.num_memory_levels = num_memory_levels
        self.unmasked_levels = tuple(unmasked_levels)
        self.num_heads = num_heads
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(self.num_memory_levels, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MaskMlp(dim)
        # False (model/inference.py, for inference): the intermediate masks are computed at the attention sizes
        # only and aux_outputs/middle_masks are left empty (training's deep supervision needs them at H/4)
        self.full_masks = True

    def forward(self, memories: list[torch.Tensor], audio: torch.Tensor, mask_features: torch.Tensor) -> dict:
        """memories: ``num_memory_levels`` maps [N, C, h_i, w_i]; audio: [N, Q, C], added to the learned query
        features (AV2TS/COMBO: audio per query; VCT: its vision-derived queries); mask_features: [N, C, H/4, W/4]."""
        sizes = [tuple(m.shape[-2:]) for m in memories]
        srcs = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(memories)]
        pos = [sine_position_embedding(h, w, m.shape[1], m.device).flatten(1).t().to(m.dtype)
               for m, (h, w) in zip(memories, sizes, strict=True)]
        query_pos = self.query_embed.weight.unsqueeze(0)
        x = self.query_feat.weight.unsqueeze(0) + audio
        if not self.full_masks:
            # bilinear resizing and the mask dot product are both linear, so resizing the mask features once per
            # size equals resizing every mask: 12 of the 13 [N, Q, H/4, W/4] masks are never made
            small = {size: F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                     for size in set(sizes)}
            visible = self._attention_heads(x, small[sizes[0]])
            for i, layer in enumerate(self.layers[:-1]):
                level = i % self.num_memory_levels
                x = layer(x, query_pos, srcs[level], pos[level], self._mask_for(level, visible))
                visible = self._attention_heads(x, small[sizes[(i + 1) % self.num_memory_levels]])
            last = (len(self.layers) - 1) % self.num_memory_levels
            x = self.layers[-1](x, query_pos, srcs[last], pos[last], self._mask_for(last, visible))
            logits, mask, _ = self._heads(x, mask_features, sizes[0])
            return {"pred_logits": logits, "pred_masks": mask, "aux_outputs": [], "middle_masks": []}

        classes, masks, middle = [], [], []
        logits, mask, visible = self._heads(x, mask_features, sizes[0])
        classes.append(logits)
        masks.append(mask)
        for i, layer in enumerate(self.layers):
            level = i % self.num_memory_levels
            x = layer(x, query_pos, srcs[level], pos[level], self._mask_for(level, visible))
            middle.append(mask)  # the masks that fed this layer: initial and layers 0 .. L-2
            logits, mask, visible = self._heads(x, mask_features, sizes[(i + 1) % self.num_memory_levels])
            classes.append(logits)
            masks.append(mask)
        n, q = mask.shape[:2]
        return {
            "pred_logits": classes[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes[:-1], masks[:-1], strict=True)],
            "middle_masks": [m.reshape(n, q, -1) for m in middle],
        }

    def _mask_for(self, level: int, visible: torch.Tensor) -> torch.Tensor | None:
        """The attention mask of a layer reading memory ``level``: None (all visible) for an unmasked level."""
        return None if level in self.unmasked_levels else visible

    def _heads(self, x: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int]):
        """x: [N, Q, C] -> (class logits [N, Q, K+1], mask logits [N, Q, H/4, W/4], what the next layer may attend
        to: bool [N, 1, Q, h*w] at ``attn_size``, the same for every head)."""
        x = self.norm(x)
        logits = self.class_embed(x)
        mask = torch.einsum("nqc,nchw->nqhw", self.mask_embed(x), mask_features)
        small = F.interpolate(mask, size=attn_size, mode="bilinear", align_corners=False)
        return logits, mask, _visible(small)

    def _attention_heads(self, x: torch.Tensor, small_features: torch.Tensor):
        """x: [N, Q, C]; small_features: mask features resized to the next layer's attention size [N, C, h, w] ->
        visible bool [N, 1, Q, h*w]: ``_heads`` without the class logits and the H/4 masks."""
        return _visible(torch.einsum("nqc,nchw->nqhw", self.mask_embed(self.norm(x)), small_features))


def _visible(small: torch.Tensor) -> torch.Tensor:
    """Mask logits [N, Q, h, w] -> what the next layer may attend to, bool [N, 1, Q, h*w]."""
    visible = (small.sigmoid().flatten(2) >= 0.5).detach()  # the reference hides sigmoid < 0.5
    visible[~visible.any(dim=-1)] = True  # a query that would see nothing sees everything
    return visible.unsqueeze(1)
