"""COMBO's bilateral fusion of the stride-4 mask features with one audio embedding per frame, and the audio MLP
that turns the fused audio into the width of the queries (docs/model.md, 'COMBO').

Per frame: the mask features [C, H, W] get a level embedding and are flattened to H*W visual tokens; the audio
embedding is a single token. Both are layer-normalised. One bi-directional attention with 8 heads then computes,
per head, a logit between every visual token (query, with a sine position embedding) and the audio token (key,
with a learned position embedding), and normalises these H*W logits with one softmax over the *positions*:

- each visual token receives its probability times the audio value (so with one audio token, the visual update
  is the audio value scaled by where the audio "points");
- the audio token receives the probability-weighted sum of the visual values.

Each stream keeps its normalised input plus a layer-scaled update (scale initialised to 1e-4). The fused map is
the per-pixel embedding of every mask; the fused audio goes through the MLP ``audio_dim -> 4096 -> 4096 -> C``
and is then added to the learned queries (model/combo.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.model.blocks import sine_position_embedding

LOGIT_CLAMP = 50000.0  # the reference clamps the logits to +-5e4 (a guard for fp16); kept for identical results


class BilateralAttention(nn.Module):
    """Multi-head attention between visual tokens [N, L, C_v] and one audio token [N, 1, C_a], both directions.

    Projections: ``v_proj`` (queries) and ``values_v_proj`` from the visual width, ``a_proj`` (keys) and
    ``values_a_proj`` from the audio width, all to ``embed_dim``; ``out_v_proj`` / ``out_a_proj`` back.
    """

    def __init__(self, visual_dim: int, audio_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the width {embed_dim}")
        self.num_heads, self.dropout = num_heads, dropout
        self.scale = (embed_dim // num_heads) ** -0.5
        self.v_proj = nn.Linear(visual_dim, embed_dim)
        self.a_proj = nn.Linear(audio_dim, embed_dim)
        self.values_v_proj = nn.Linear(visual_dim, embed_dim)
        self.values_a_proj = nn.Linear(audio_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, visual_dim)
        self.out_a_proj = nn.Linear(embed_dim, audio_dim)
        for layer in (self.v_proj, self.a_proj, self.values_v_proj, self.values_a_proj, self.out_v_proj,
                      self.out_a_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, v: torch.Tensor, a: torch.Tensor, pos_v: torch.Tensor, pos_a: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """v: [N, L, C_v] visual tokens; a: [N, 1, C_a] the audio token; pos_v: [L, C_v]; pos_a: [1, C_a]
        -> (delta_v [N, L, C_v], delta_a [N, 1, C_a])."""
        if a.dim() != 3 or a.shape[1] != 1 or a.shape[0] != v.shape[0]:
            raise ValueError(f"audio must be one token per frame [N, 1, C] with N = {v.shape[0]}, "
                             f"got {list(a.shape)}")
        n, length, _ = v.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # [N, S, E] -> [N, heads, S, E/heads]
            return x.view(n, x.shape[1], heads, -1).transpose(1, 2)

        q = split(self.v_proj(v + pos_v) * self.scale)  # [N, h, L, d]
        k = split(self.a_proj(a + pos_a))  # [N, h, 1, d]
        values_v = split(self.values_v_proj(v))  # [N, h, L, d]
        values_a = split(self.values_a_proj(a))  # [N, h, 1, d]
        logits = (q @ k.transpose(-2, -1)).squeeze(-1).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)  # [N, h, L]
        # The reference normalises the visual side with a softmax over the positions and the audio side with a
        # softmax over the same positions of the same logits after subtracting their maximum (and clamping that
        # difference at -5e4, where exp() is 0 either way): the same probabilities, so one softmax serves both.
        probs = logits.softmax(dim=-1)
        probs_v = F.dropout(probs, self.dropout, self.training)  # independent dropout masks, as in the reference
        probs_a = F.dropout(probs, self.dropout, self.training)
        out_v = probs_v.unsqueeze(-1) * values_a  # [N, h, L, d]: each position's share of the audio value
        out_a = probs_a.unsqueeze(-2) @ values_v  # [N, h, 1, d]: the attention-weighted visual values
        merge = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731  [N, h, S, d] -> [N, S, E]
        return self.out_v_proj(merge(out_v)), self.out_a_proj(merge(out_a))


class AudioMlp(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear: [..., in_dim] -> [..., out_dim] (128 -> 4096 -> 4096 -> 256)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                    nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_dim] -> [..., out_dim]."""
        return self.layers(x)


class BilateralFusion(nn.Module):
    """(mask features [N, C, H, W], audio embeddings [N, 1, A]) -> (fused map [N, C, H, W], audio queries'
    addend [N, 1, C]): level embedding, layer norms, one ``BilateralAttention``, layer-scaled residuals, then the
    audio MLP on the fused audio."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int = 8, mlp_dim: int = 4096,
                 layer_scale_init: float = 1e-4, dropout: float = 0.1):
        super().__init__()
        self.level_embed = nn.Embedding(1, dim)
        self.audio_pos = nn.Embedding(1, audio_dim)
        self.norm_visual = nn.LayerNorm(dim)
        self.norm_audio = nn.LayerNorm(audio_dim)
        self.attn = BilateralAttention(dim, audio_dim, dim, num_heads, dropout)
        self.gamma_visual = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma_audio = nn.Parameter(torch.full((audio_dim,), layer_scale_init))
        self.audio_mlp = AudioMlp(audio_dim, mlp_dim, dim)

    def forward(self, mask_features: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mask_features: [N, C, H, W]; audio: [N, 1, A] -> (fused map [N, C, H, W], audio [N, 1, C])."""
        if mask_features.dim() != 4 or mask_features.shape[1] != self.level_embed.weight.shape[1]:
            raise ValueError(f"mask features must be [N, {self.level_embed.weight.shape[1]}, H, W], "
                             f"got {list(mask_features.shape)}")
        n, c, h, w = mask_features.shape
        pos_v = sine_position_embedding(h, w, c, mask_features.device).flatten(1).t().to(mask_features.dtype)
        v = self.norm_visual(mask_features.flatten(2).transpose(1, 2) + self.level_embed.weight)  # [N, H*W, C]
        a = self.norm_audio(audio)
        delta_v, delta_a = self.attn(v, a, pos_v, self.audio_pos.weight)
        v = v + self.gamma_visual * delta_v
        a = a + self.gamma_audio * delta_a
        return v.transpose(1, 2).reshape(n, c, h, w), self.audio_mlp(a)
