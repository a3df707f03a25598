"""AV2TS: frames + audio (+ maskiges) -> class logits and mask logits per query and frame (docs/model.md, 'End-to-end
forward').

Top-level parts and the reference (OrigamiSL/AV2TS ``MaskFormer``) state-dict prefixes they replace, one tensor
for one tensor (the converter in ``convert.py`` is a rename table):

==========================  ==========================================================================
ours                        reference
==========================  ==========================================================================
``backbone.``               ``backbone.`` (detectron2 ResNet ``stem/res2..res5`` or PVT-v2 names)
``siam_backbone.``          ``pre_sam_backbone.``
``siam_gates.gates.{l}.``   ``scale_factor_module.{l}.``
``audio_encoder.``          ``audio_backbone.`` (CED; ``outputlayer.*`` dropped: never used)
``acoustic_attention.``     ``time_attn_blocks_{1,2,3}.`` -> ``blocks.{0,1,2}.``, ``time_norm.`` -> ``norm.``,
                            ``audio_linear{1..4}.`` -> ``projections.{0..3}.``
``visual_attention.``       ``visual_project.{l}.`` -> ``projections.{l}.``, ``time_visual_attn_blocks.{l}.``
                            -> ``blocks.{l}.``, ``time_visual_norm.{l}.`` -> ``norms.{l}.``
``pixel_decoder.``          ``sem_seg_head.pixel_decoder.`` (``input_proj.*`` and ``linear1.*`` dropped:
                            built by the reference but never used)
``fusion.``                 ``sem_seg_head.fusion_module.`` (``conv_proj_1`` and ``b_attn.*``)
``decoder.``                ``sem_seg_head.predictor.``
(criterion, separate)       ``criterion.empty_weight`` (a constant of the loss, dropped)
==========================  ==========================================================================

Frames are processed frame-major: row ``b*T + t`` of every [B*T, ...] tensor is frame t of clip b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.config import EXAMPLE_FRAMES, MEL_BANDS, ModelConfig
from av2ts_cli.model.audio import CEDEncoder
from av2ts_cli.model.backbone import SiamGates, backbone_channels, create_backbone
from av2ts_cli.model.decoder import MaskedAttentionDecoder
from av2ts_cli.model.fusion import OneStreamFusion
from av2ts_cli.model.pixel_decoder import PixelDecoder
from av2ts_cli.model.temporal import TemporalAcousticAttention, TemporalVisualAttention

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet, RGB 0..255
PIXEL_STD = (58.395, 57.12, 57.375)


class AV2TS(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_dim
        channels = self._build_visual_encoders(cfg)
        self.audio_encoder = CEDEncoder(cfg.audio_dim, cfg.audio_depth, cfg.audio_heads, cfg.audio_patch,
                                        cfg.audio_max_frames)
        self.audio_encoder.requires_grad_(False)  # frozen: never trained, run under no_grad
        self.acoustic_attention = TemporalAcousticAttention(cfg.audio_dim, dim, cfg.temporal_heads)
        self.visual_attention = TemporalVisualAttention(channels, dim, cfg.temporal_heads)
        self.pixel_decoder = PixelDecoder(dim, cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_points,
                                          cfg.encoder_ffn_dim)
        self.fusion = OneStreamFusion(dim, cfg.num_queries, cfg.fusion_blocks, cfg.fusion_heads,
                                      cfg.layer_scale_init)
        self.decoder = MaskedAttentionDecoder(dim, cfg.num_classes, cfg.num_queries, cfg.decoder_layers,
                                              cfg.decoder_heads, cfg.decoder_ffn_dim)
        self._register_pixel_statistics()

    def _build_visual_encoders(self, cfg: ModelConfig) -> list[int]:
        """The frame backbone and, with the Siam encoder, its unshared twin for maskiges and the gates that add it
        (both families build them alike); returns the backbone's channels per stage."""
        self.backbone = create_backbone(cfg)
        channels = backbone_channels(self.backbone)
        if cfg.siam:
            self.siam_backbone = create_backbone(cfg)
            self.siam_gates = SiamGates(channels, cfg.siam_gate_reduction)
        return channels

    def _register_pixel_statistics(self) -> None:
        """ImageNet mean and std [1, 3, 1, 1] for normalising 0..255 frames (buffers, not saved)."""
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None) -> dict:
        """frames: [B, T, 3, H, W] RGB 0..255 (H, W multiples of 32); audio: [B, T, 96, 64] log-mel examples, one
        per frame; maskiges: [B, T, 3, H, W] RGB 0..255, required iff the config has the Siam encoder.

        Returns {"pred_logits": [B*T, Q, K+1], "pred_masks": [B*T, Q, H/4, W/4], "aux_outputs": list of the
        earlier {"pred_logits", "pred_masks"}, "middle_masks": list of [B*T, Q, H/4 * W/4]} (frame-major rows).
        ValueError for inputs of other shapes, or without the maskiges a Siam model needs.
        """
        b, t = self._check_inputs(frames, audio, maskiges)
        features = self.backbone(self._normalise(frames))
        if self.cfg.siam:
            features = self.siam_gates(features, self.siam_backbone(self._normalise(maskiges)))

        with torch.no_grad():
            tokens = self.audio_encoder(audio.flatten(0, 1).float())  # [B*T, 24, C_audio]
        audio_queries, shared_logits = self.acoustic_attention(tokens, t)  # [B*T, Q, C], [B, heads, T, T]
        features = self.visual_attention(features, shared_logits)

        mask_features, memories = self.pixel_decoder(features)
        fused_visual, fused_audio = self.fusion(mask_features, audio_queries)
        return self.decoder(memories + [fused_visual], fused_audio, mask_features)

    def segment(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Semantic maps [B, T, K, H, W] at the input size (docs/model.md, 'Semantic maps'): the sum over queries of
        softmax(class)[:K] times sigmoid(mask), masks upsampled bilinearly first. Run it under the caller's
        ``torch.no_grad()`` / ``torch.inference_mode()``."""
        b, t = frames.shape[:2]
        out = self(frames, audio, maskiges)
        # float32 from here, also under autocast (which would run the sum over queries in bf16)
        with torch.autocast(frames.device.type, enabled=False):
            probs = out["pred_logits"].float().softmax(-1)[..., :-1]  # [N, Q, K]: the no-object class dropped
            masks = out["pred_masks"]  # [N, Q, H/4, W/4]
            # One frame at a time, the sigmoid in place: all N at once wrote N x Q full-size masks (96 MB for
            # av2ts-r50's 5 frames at 224 px) and a sigmoid copy of them. The same numbers bit for bit; in
            # av2ts-r50's profile on the 2-core CPU this tail took 64 ms instead of 91 (upsampling 49 vs 52,
            # sigmoid under 2 vs 33, the sum over queries 10 vs 6), and it holds 19 MB of masks instead of 192.
            semseg = torch.cat([
                torch.einsum("nqk,nqhw->nkhw", probs[i:i + 1],
                             F.interpolate(masks[i:i + 1].float(), size=frames.shape[-2:], mode="bilinear",
                                           align_corners=False).sigmoid_())
                for i in range(masks.shape[0])])
        return semseg.reshape(b, t, *semseg.shape[1:])

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] 0..255 -> [B*T, 3, H, W] normalised (in fp32), in the backbone's memory format and
        weight dtype (bf16 once ``model.inference.prepare_for_inference`` cast it), in one copy."""
        x = (images.flatten(0, 1).float() - self.pixel_mean) / self.pixel_std
        weight = next(p for p in self.backbone.parameters() if p.dim() == 4)
        return x.to(dtype=weight.dtype, memory_format=self._memory_format(weight))

    def _memory_format(self, weight: torch.Tensor) -> torch.memory_format:
        channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        return torch.channels_last if channels_last else torch.contiguous_format

    def _check_inputs(self, frames, audio, maskiges) -> tuple[int, int]:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {list(frames.shape)}")
        b, t, _, h, w = frames.shape
        if h % 32 or w % 32:
            raise ValueError(f"frame size {h}x{w} is not a multiple of 32")
        if tuple(audio.shape) != (b, t, EXAMPLE_FRAMES, MEL_BANDS):
            raise ValueError(f"audio must be [B, T, {EXAMPLE_FRAMES}, {MEL_BANDS}] = "
                             f"[{b}, {t}, {EXAMPLE_FRAMES}, {MEL_BANDS}], got {list(audio.shape)}")
        if self.cfg.siam and maskiges is None:
            raise ValueError(f"model {self.cfg.preset} uses the Siam encoder: maskiges are required")
        if maskiges is not None and self.cfg.siam and maskiges.shape != frames.shape:
            raise ValueError(f"maskiges {list(maskiges.shape)} must have the frames' shape {list(frames.shape)}")
        return b, t


def foreground_probability(semseg: torch.Tensor) -> torch.Tensor:
    """[..., 2, H, W] S4/MS3 semantic map -> [..., H, W] probability of the sounding object (softmax over the two
    channels, channel 1), the quantity the AVSBench evaluation thresholds at 0.5."""
    if semseg.shape[-3] != 2:
        raise ValueError(f"foreground_probability needs a 2-class map, got {semseg.shape[-3]} classes")
    return semseg.float().softmax(dim=-3)[..., 1, :, :]


def class_map(semseg: torch.Tensor) -> torch.Tensor:
    """[..., K, H, W] semantic map -> [..., H, W] int64 class indices (argmax)."""
    return semseg.argmax(dim=-3)
