"""COMBO (CVPR 2024), the second network family: frames + audio (+ maskiges) -> class and mask logits per query and
frame (docs/model.md, 'COMBO'). AV2TS was forked from it file for file.

Shared with AV2TS, one implementation each: the visual backbone and the Siam encoder with its gates
(model/backbone.py), the deformable-attention pixel decoder (model/pixel_decoder.py, here with its input
projections and the lateral conv from res2's native width), the masked-attention decoder and its heads
(model/decoder.py, here over 3 memory levels), and the input checks, normalisation and ``segment`` (inherited
from ``AV2TS``; ``AV2TS.__init__`` is not run, COMBO builds its own parts). COMBO's own: a frozen VGGish
(model/vggish.py, one 128-d embedding per frame) and the bilateral fusion + audio MLP (model/bilateral_fusion.py)
on the stride-4 mask features, whose fused map is the per-pixel embedding of every mask. No audio enters before
the pixel decoder.

Top-level parts and the COMBO reference (yannqi/COMBO-AVS ``MaskFormer``) state-dict prefixes they replace, one
tensor for one tensor (the importer in ``convert_combo.py`` is a rename table):

==========================  ==========================================================================
ours                        reference
==========================  ==========================================================================
``backbone.``               ``backbone.`` (detectron2 ResNet ``stem/res2..res5`` or PVT-v2 names)
``siam_backbone.``          ``pre_sam_backbone.``
``siam_gates.gates.{l}.``   ``scale_factor_module.{l}.``
``audio_encoder.``          ``audio_backbone.`` (VGGish, same inner names)
``pixel_decoder.``          ``sem_seg_head.pixel_decoder.`` (``input_proj.{l}.{0,1}`` kept)
``fusion.``                 ``sem_seg_head.fusion_module.`` (``b_attn.*``), ``fusion.audio_mlp.`` from
                            ``sem_seg_head.audio_transformation.``
``decoder.``                ``sem_seg_head.predictor.``
(criterion, separate)       ``criterion.empty_weight`` (a constant of the loss, dropped)
==========================  ==========================================================================

Frames are processed frame-major: row ``b*T + t`` of every [B*T, ...] tensor is frame t of clip b.
"""

from __future__ import annotations

import torch
from torch import nn

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.av2ts import AV2TS
from av2ts_cli.model.bilateral_fusion import BilateralFusion
from av2ts_cli.model.decoder import MaskedAttentionDecoder
from av2ts_cli.model.pixel_decoder import PixelDecoder
from av2ts_cli.model.vggish import VGGish

MEMORY_LEVELS = 3  # the decoder attends to the pixel decoder's strides 32, 16, 8 in turn


def query_audio_frames(num_frames: int, num_queries: int, device=None) -> torch.Tensor:
    """[T, Q] int64: the frame whose audio query q of frame t receives, ``(q * T + t) // Q``.

    This is the arithmetic of the reference decoder for one clip (T frames in the batch, which is how COMBO
    evaluates): ``audio.repeat(1, Q, 1).reshape(Q, -1, C)`` on the [T, 1, C] audio lays out Q copies of frame
    0, then Q of frame 1, ..., and reads that sequence back as [Q, T]: entry (q, t) is element q*T + t. It is not
    a transpose: every frame's queries see the *same* audio, query q that of frame (q*T + t) // Q; with T = 5 and
    Q = 100 that is frame q // 20 for every t (queries 0-19 carry frame 0's sound, 20-39 frame 1's, ...).
    """
    q = torch.arange(num_queries, device=device)
    t = torch.arange(num_frames, device=device)
    return (q[None, :] * num_frames + t[:, None]) // num_queries


def audio_for_queries(audio: torch.Tensor, num_queries: int) -> torch.Tensor:
    """audio: [B, T, C], one fused audio vector per frame -> [B*T, Q, C], what is added to the learned queries.

    Batches of several clips: the one-clip rule of ``query_audio_frames`` is applied within each clip, in
    training, evaluation and prediction alike. The reference applies its reshape to the whole batch (B*T frames),
    so in its training (8 clips) queries receive other clips' sounds and a clip's result depends on its
    batch-mates; av2ts does not copy that: a clip gives the same result alone or batched, equal to the
    reference's one-clip-per-batch evaluation.
    """
    if audio.dim() != 3:
        raise ValueError(f"audio must be [B, T, C], got {list(audio.shape)}")
    source = query_audio_frames(audio.shape[1], num_queries, audio.device)  # [T, Q]
    return audio[:, source].flatten(0, 1)  # [B, T, Q, C] -> [B*T, Q, C]


class COMBO(AV2TS):
    """The COMBO network for a ``ModelConfig`` with ``family="combo"`` (presets combo-r50, combo-pvt, combo-tiny)."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)  # not AV2TS.__init__: only its checks, normalisation and segment are shared
        if cfg.family != "combo":
            raise ValueError(f"model config {cfg.preset!r} is of family {cfg.family!r}, not combo")
        self.cfg = cfg
        dim = cfg.hidden_dim
        channels = self._build_visual_encoders(cfg)
        self.audio_encoder = VGGish(cfg.vggish_widths, cfg.vggish_hidden, cfg.audio_dim)
        self.audio_encoder.requires_grad_(False)  # frozen: never trained, run under no_grad
        self.pixel_decoder = PixelDecoder(dim, cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_points,
                                          cfg.encoder_ffn_dim, in_channels=channels)
        self.fusion = BilateralFusion(dim, cfg.audio_dim, cfg.fusion_heads, cfg.audio_mlp_dim, cfg.layer_scale_init)
        self.decoder = MaskedAttentionDecoder(dim, cfg.num_classes, cfg.num_queries, cfg.decoder_layers,
                                              cfg.decoder_heads, cfg.decoder_ffn_dim, MEMORY_LEVELS)
        self._register_pixel_statistics()

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None) -> dict:
        """frames: [B, T, 3, H, W] RGB 0..255 (H, W multiples of 32); audio: [B, T, 96, 64] log-mel examples, one
        per frame; maskiges: [B, T, 3, H, W] RGB 0..255, required iff the config has the Siam encoder.

        Returns {"pred_logits": [B*T, Q, K+1], "pred_masks": [B*T, Q, H/4, W/4], "aux_outputs": list of the
        earlier {"pred_logits", "pred_masks"} (decoder_layers of them), "middle_masks": list of
        [B*T, Q, H/4 * W/4]} (frame-major rows), as ``AV2TS.forward``.
        """
        b, t = self._check_inputs(frames, audio, maskiges)
        features = self.backbone(self._normalise(frames))
        if self.cfg.siam:
            features = self.siam_gates(features, self.siam_backbone(self._normalise(maskiges)))

        with torch.no_grad():
            embeddings = self.audio_encoder(audio.flatten(0, 1).unsqueeze(1).float())  # [B*T, A]

        mask_features, memories = self.pixel_decoder(features)  # [B*T, C, H/4, W/4], 3 levels
        fused_visual, fused_audio = self.fusion(mask_features, embeddings.unsqueeze(1))  # [.., C, H/4, W/4], [.., 1, C]
        queries_audio = audio_for_queries(fused_audio.reshape(b, t, -1), self.cfg.num_queries)
        return self.decoder(memories, queries_audio, fused_visual)
