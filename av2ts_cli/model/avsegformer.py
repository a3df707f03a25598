"""AVSegFormer (AAAI 2024), the third network family: frames + audio -> per-pixel logits, one frame at a time.

The reference is vvvb-github/AVSegFormer at 7083cb6. Per frame: a frozen VGGish embedding of the frame's log-mel
example, projected to one audio token (``audio_proj``, 128 -> 256); a timm backbone (PVT-v2-b5 or ResNet-50) giving
four maps at strides 4..32; the head (model/avsegformer_head.py): input projections, a 6-layer deformable encoder
over strides 8/16/32, 300 queries from an audio query generator plus learned queries, a 6-layer decoder over the
encoder tokens, the stride-4 mask feature gated by the cross-modal mixer, and the prediction (query similarity maps
-> 1x1-conv MLP -> added to the mask feature -> convs with a x4 upsampling). There is no temporal module and no
Siam encoder: a frame's output depends on that frame and its audio only.

Outputs per frame: 1 logit channel for S4/MS3 (``sigmoid > 0.5`` is the object) and 71 for AVSS (softmax over
classes, class 0 background): ``output_channels(cfg)``.

Top-level parts and the reference state-dict prefixes they replace, one tensor for one tensor
(``av2ts_cli/weights/convert_avsegformer.py`` is a rename table):

==============================  ===================================================================
ours                            reference
==============================  ===================================================================
``backbone.``                   ``backbone.`` (PVT-v2 names -> timm's, or B2_ResNet's branch 1 ->
                                timm ``resnet50``: ``layer3_1``/``layer4_1`` -> ``layer3``/``layer4``)
``audio_encoder.``              ``vggish.`` (the same inner names, model/vggish.py, shared with COMBO)
``audio_proj.``                 ``audio_proj.``
``head.encoder.{i}.``           ``head.transformer.encoder.layers.{i}.`` (``self_attn`` -> ``attn``,
                                ``linear{1,2}`` -> ``fc{1,2}``)
``head.decoder.{i}.``           ``head.transformer.decoder.layers.{i}.`` (``linear{1,2}`` -> ``fc{1,2}``)
``head.mixer.``                 ``head.fusion_block.``
``head.mlp.{i}.``               ``head.mlp.layers.{i}.``
``head.*`` (the rest)           ``head.*`` (in_proj, level_embed, query_generator, learnable_query,
                                lateral_conv, out_conv, fc: the same names)
(not built)                     ``head.fpn.*``, ``head.attn_fc.*`` (built, never run by the reference),
                                ``backbone.layer3_2.*``, ``backbone.layer4_2.*`` (ResNet branch 2, never run)
==============================  ===================================================================

Frames are processed frame-major: row ``b*T + t`` of every [B*T, ...] tensor is frame t of clip b.
"""

from __future__ import annotations

import torch
from torch import nn

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.av2ts import AV2TS
from av2ts_cli.model.avsegformer_head import AVSegFormerHead
from av2ts_cli.model.backbone import backbone_channels, create_backbone
from av2ts_cli.model.vggish import VGGish


def output_channels(cfg: ModelConfig) -> int:
    """Logit channels of the network: 1 for a binary subset (K = 2: the reference's ``num_classes=1``, a sigmoid
    logit for the object), else K (71 for AVSS, background included, softmax over them)."""
    return 1 if cfg.num_classes == 2 else cfg.num_classes


class AVSegFormer(AV2TS):
    """The AVSegFormer network for a ``ModelConfig`` with ``family="avsegformer"`` (presets avsegformer-pvt,
    avsegformer-r50, avsegformer-tiny). Shares ``AV2TS``'s input checks and normalisation, not its parts."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)  # not AV2TS.__init__: only its checks and normalisation are shared
        if cfg.family != "avsegformer":
            raise ValueError(f"model config {cfg.preset!r} is of family {cfg.family!r}, not avsegformer")
        if cfg.siam:
            raise ValueError(f"model config {cfg.preset!r}: AVSegFormer has no Siam encoder")
        self.cfg = cfg
        self.backbone = create_backbone(cfg)
        self.audio_encoder = VGGish(cfg.vggish_widths, cfg.vggish_hidden, cfg.audio_dim)
        self.audio_encoder.requires_grad_(False)  # frozen: never trained, run under no_grad
        self.audio_proj = nn.Linear(cfg.audio_dim, cfg.hidden_dim)
        self.head = AVSegFormerHead(cfg, backbone_channels(self.backbone), output_channels(cfg))
        self._register_pixel_statistics()

    def reference_only_parameters(self) -> dict[str, int]:
        """{what: parameters} that the reference builds and saves but never runs and this network leaves out:
        ``head.fpn`` (3 x Conv3x3 d -> d with bias), ``head.attn_fc`` (``head.fc``'s layout) and, with ResNet-50,
        B2_ResNet's second branch (``layer3``/``layer4``'s layout). ``av2ts info --model`` adds them to state the
        reference's count (PVT S4 186,053,504; R50 MS3 150,902,528). Empty for avsegformer-tiny (no reference
        network has its backbone)."""
        if self.cfg.backbone not in ("pvt_v2_b5", "resnet50"):
            return {}
        d = self.cfg.hidden_dim
        left_out = {"head.fpn, never run": 3 * (d * d * 9 + d),
                    "head.attn_fc, never run": sum(p.numel() for p in self.head.fc.parameters())}
        if self.cfg.backbone == "resnet50":
            left_out["the ResNet's second branch (layer3_2, layer4_2), never run"] = sum(
                p.numel() for name in ("layer3", "layer4") for p in getattr(self.backbone, name).parameters())
        return left_out

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Switch the backbone's gradients off or on (the reference trains it frozen for its first epochs)."""
        self.backbone.requires_grad_(not frozen)

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None) -> dict:
        """frames: [B, T, 3, H, W] RGB 0..255 (H, W multiples of 32); audio: [B, T, 96, 64] log-mel examples, one
        per frame; maskiges: accepted and unused (no Siam encoder); frame_mask: [B, T] 1 for a real frame and 0 for
        a padded slot (the reference's AVSS ``vid_temporal_mask_flag``), or None for all real.

        Returns {"logits": [B*T, O, H, W], "mask_features": [B*T, C, H/4, W/4]} (frame-major rows; O =
        ``output_channels(cfg)``, C = hidden_dim). ``mask_features`` feeds the reference's auxiliary "mix" loss (a
        dice on the sigmoid of its channel mean). Padded slots give all-zero logits and mask features, their
        backbone maps are zeroed before the head, and their audio still runs (as in the reference).
        ValueError for inputs of other shapes.
        """
        b, t = self._check_inputs(frames, audio, None)
        flag = None
        if frame_mask is not None:
            if tuple(frame_mask.shape) != (b, t):
                raise ValueError(f"frame_mask must be [B, T] = [{b}, {t}], got {list(frame_mask.shape)}")
            flag = frame_mask.reshape(b * t, 1, 1, 1)

        with torch.no_grad():
            embedding = self.audio_encoder(audio.flatten(0, 1).unsqueeze(1).float())  # [B*T, A]
        audio_token = self.audio_proj(embedding.to(self.audio_proj.weight.dtype)).unsqueeze(1)  # [B*T, 1, C]

        features = self.backbone(self._normalise(frames))  # 4 maps [B*T, C_l, H/s, W/s]
        if flag is not None:
            features = [f * flag.to(f.dtype) for f in features]
        logits, mask_features = self.head(features, audio_token)
        if flag is not None:
            logits, mask_features = logits * flag.to(logits.dtype), mask_features * flag.to(mask_features.dtype)
        return {"logits": logits, "mask_features": mask_features}

    def segment(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Semantic maps [B, T, K, H, W] at the input size (maskiges unused), as ``AV2TS.segment``, in float32.

        The channels are scores whose softmax over K is the reference's class probability: for S4/MS3 (one logit
        z) the map is [0, z], so ``foreground_probability`` gives exactly sigmoid(z) and its 0.5 threshold is the
        reference's ``sigmoid(z) > 0.5``; for AVSS the 71 logits themselves, so ``class_map`` is the reference's
        softmax-argmax. Run it under the caller's ``torch.no_grad()`` / ``torch.inference_mode()``."""
        b, t = frames.shape[:2]
        logits = self(frames, audio, maskiges, frame_mask)["logits"].float()
        if logits.shape[1] == 1:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        return logits.reshape(b, t, *logits.shape[1:])
