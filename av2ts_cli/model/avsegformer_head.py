"""AVSegFormer's head (``AVSegHead`` of the reference): input projections, the deformable encoder, the audio query
generator, the decoder, the mask feature with the cross-modal mixer, and the per-pixel prediction.

Everything runs per frame: the batch dimension is N = B*T frames and no module mixes frames. Widths are ``dim``
(256 in the reference); shapes below are for a frame of H x W pixels, so the four backbone maps are H/4 .. H/32.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.pixel_decoder import DeformableAttention

ENCODER_LEVELS = 3  # the backbone maps at strides 8, 16, 32 feed the encoder; stride 4 only the mask feature
HEAD_WIDTHS = (128, 32)  # the prediction convs: dim -> 128 (3x3) -> x4 upsampling -> 32 (3x3) -> classes (1x1)


def sine_positions(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """[h*w, dim] DETR sine encoding, *not* normalised (the reference's ``SinePositionalEncoding(normalize=False)``;
    model/blocks.py has the normalised one): 1-based row y and column x, channel k of each half is sin (k even) or
    cos (k odd) of pos / 10000^(2*floor(k/2)/(dim/2)); the first half encodes y, the second x. Row-major tokens."""
    half = dim // 2
    dim_t = 10000 ** (2 * (torch.arange(half, dtype=torch.float32, device=device) // 2) / half)

    def encode(n: int) -> torch.Tensor:  # [n, half], sin and cos interleaved as in the reference
        p = torch.arange(1, n + 1, dtype=torch.float32, device=device)[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(height)[:, None, :].expand(height, width, half)
    pos_x = encode(width)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(height * width, dim)


def cell_centres(height: int, width: int, device=None) -> torch.Tensor:
    """[h*w, 2] (x, y) = ((j + 0.5) / w, (i + 0.5) / h), row-major: the encoder's reference points. The same point
    samples every level (the reference scales it by valid ratios of 1)."""
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    return torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)], -1).reshape(-1, 2)


class EncoderLayer(nn.Module):
    """Post-norm deformable self-attention layer with a GELU FFN: ``src = norm1(src + attn(src + pos, src))``, then
    ``src = norm2(src + fc2(gelu(fc1(src))))``; dropout after the attention, the activation and fc2 (training)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_points: int, dropout: float):
        super().__init__()
        self.attn = DeformableAttention(dim, ENCODER_LEVELS, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        """src: [N, S, C]; pos: [1, S, C]; reference_points: [1, S, 2] -> [N, S, C]."""
        attended = self.attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(src))))))


class GeneratorLayer(nn.Module):
    """One layer of the audio query generator (the reference's ``AttentionLayer``): post-norm self-attention over the
    queries, cross-attention to the audio token, GELU FFN. Both attentions have no biases and no dropout.

    With a single audio token the cross-attention's softmax is identically 1, so every query receives the same
    ``out_proj(W_v audio)``; it is computed with the general attention all the same (the weights are the
    reference's ``in_proj_weight``, whose query and key rows are therefore never used)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, bias=False, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, bias=False, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """query: [N, Q, C]; audio: [N, 1, C] -> [N, Q, C]."""
        query = self.norm1(query + self.self_attn(query, query, query, need_weights=False)[0])
        query = self.norm2(query + self.cross_attn(query, audio, audio, need_weights=False)[0])
        return self.norm3(query + self.ffn(query))


class QueryGenerator(nn.Module):
    """Learned queries [Q, C] refined by ``num_layers`` GeneratorLayers against each frame's audio token."""

    def __init__(self, dim: int, num_queries: int, num_layers: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.query = nn.Embedding(num_queries, dim)
        self.layers = nn.ModuleList(GeneratorLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: [N, 1, C] -> queries [N, Q, C]."""
        query = self.query.weight[None].expand(audio.shape[0], -1, -1)
        for layer in self.layers:
            query = layer(query, audio)
        return query


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, cross-attention to all encoder tokens (no positional term on either
    side, no mask), GELU FFN; standard biased attentions with attention dropout, dropout after each sub-layer."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query: [N, Q, C]; memory: [N, S, C] -> [N, Q, C]."""
        query = self.norm1(query + self.dropout(self.self_attn(query, query, query, need_weights=False)[0]))
        query = self.norm2(query + self.dropout(self.cross_attn(query, memory, memory, need_weights=False)[0]))
        return self.norm3(query + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(query))))))


class CrossModalMixer(nn.Module):
    """A channel gate from the audio token attending to the pixels: q = Wq a (one token), [k | v] = Wkv X over the
    H*W pixels X (no biases, heads of dim/heads), g = sigmoid(proj(softmax(q kᵀ / sqrt(d)) v)), out = X * g per
    channel. Works for any N (the reference's ``squeeze`` breaks at N = 1)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, feature_map: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """feature_map: [N, C, H, W]; audio: [N, 1, C] -> [N, C, H, W]."""
        n, c = feature_map.shape[:2]
        heads = self.num_heads
        pixels = feature_map.flatten(2).transpose(1, 2)  # [N, HW, C]
        q = self.q_proj(audio).view(n, 1, heads, c // heads).transpose(1, 2)  # [N, h, 1, d]
        # k is the first C outputs, v the last C, each split head-major (the reference's reshape)
        k, v = self.kv_proj(pixels).view(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)  # [N, h, HW, d] each
        mixed = F.scaled_dot_product_attention(q, k, v)  # [N, h, 1, d], scale d^-0.5 as the reference's
        gate = torch.sigmoid(self.proj(mixed.transpose(1, 2).reshape(n, c)))  # [N, C]
        return feature_map * gate[:, :, None, None]


class AVSegFormerHead(nn.Module):
    """Backbone maps (4 levels) + audio token -> (logits [N, classes, H, W], mask feature [N, C, H/4, W/4])."""

    def __init__(self, cfg: ModelConfig, in_channels: list[int], out_channels: int):
        super().__init__()
        dim, queries = cfg.hidden_dim, cfg.num_queries
        # 1x1 conv + GroupNorm(32) per backbone level; level 0 (stride 4) feeds only the mask feature
        self.in_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim))
                                     for c in in_channels)
        self.level_embed = nn.Parameter(torch.empty(ENCODER_LEVELS, dim))
        self.encoder = nn.ModuleList(
            EncoderLayer(dim, cfg.encoder_ffn_dim, cfg.encoder_heads, cfg.encoder_points, cfg.transformer_dropout)
            for _ in range(cfg.encoder_layers))
        self.query_generator = QueryGenerator(dim, queries, cfg.generator_layers, cfg.generator_heads,
                                              cfg.generator_ffn_dim)
        self.learnable_query = nn.Embedding(queries, dim)
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, cfg.decoder_heads, cfg.decoder_ffn_dim, cfg.transformer_dropout)
            for _ in range(cfg.decoder_layers))
        self.lateral_conv = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1), nn.GroupNorm(32, dim))
        self.out_conv = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1), nn.GroupNorm(32, dim),
                                      nn.ReLU())
        self.mixer = CrossModalMixer(dim, cfg.fusion_heads)
        # 1x1 convs over the Q per-query similarity maps: Q -> mask_mlp_dim -> mask_mlp_dim -> dim, ReLU between
        hidden = cfg.mask_mlp_dim
        self.mlp = nn.ModuleList(nn.Conv2d(a, b, kernel_size=1)
                                 for a, b in ((queries, hidden), (hidden, hidden), (hidden, dim)))
        wide, narrow = HEAD_WIDTHS
        self.fc = nn.Sequential(
            nn.Conv2d(dim, wide, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),  # stride 4 -> input resolution
            nn.Conv2d(wide, narrow, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(narrow, out_channels, kernel_size=1, bias=False))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # the reference's init: xavier on every matrix of the head, then Deformable-DETR's init of the deformable
        # attentions, a normal level embedding
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder:
            layer.attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, features: list[torch.Tensor], audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features: 4 maps [N, C_l, H/s, W/s], s = 4, 8, 16, 32; audio: [N, 1, C] (the projected VGGish token).

        Returns (logits [N, out_channels, H, W], mask feature [N, C, H/4, W/4])."""
        n, device = features[0].shape[0], features[0].device
        fine = self.in_proj[0](features[0])  # [N, C, H/4, W/4]
        levels = [self.in_proj[i](features[i]) for i in range(1, ENCODER_LEVELS + 1)]  # strides 8, 16, 32
        dim = fine.shape[1]
        shapes = [tuple(f.shape[-2:]) for f in levels]
        # tokens of all levels in one sequence, stride 8 first: S = sum(h_l * w_l)
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], dim=1)  # [N, S, C]
        pos = torch.cat([sine_positions(h, w, dim, device) + self.level_embed[i]
                         for i, (h, w) in enumerate(shapes)])[None].to(src.dtype)  # [1, S, C]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([0, *accumulate(sizes[:-1])], dtype=torch.long, device=device)
        reference_points = torch.cat([cell_centres(h, w, device) for h, w in shapes])[None]  # [1, S, 2]
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, reference_points, spatial_shapes, level_start_index)

        query = self.query_generator(audio) + self.learnable_query.weight  # [N, Q, C]
        for layer in self.decoder:
            query = layer(query, memory)  # only the last layer's output is used: no auxiliary outputs

        # mask feature: the encoded stride-8 level upsampled onto the lateral stride-4 map, a 3x3 conv, the mixer
        h8, w8 = shapes[0]
        coarse = memory[:, :h8 * w8].transpose(1, 2).reshape(n, dim, h8, w8)
        lateral = self.lateral_conv(fine)
        mask_feature = lateral + F.interpolate(coarse, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        mask_feature = self.mixer(self.out_conv(mask_feature), audio)  # [N, C, H/4, W/4]

        similarity = torch.einsum("nqc,nchw->nqhw", query, mask_feature)  # [N, Q, H/4, W/4]
        for i, conv in enumerate(self.mlp):
            similarity = conv(similarity) if i == len(self.mlp) - 1 else F.relu(conv(similarity))
        return self.fc(mask_feature + similarity), mask_feature

