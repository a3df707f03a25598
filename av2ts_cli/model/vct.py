"""VCT (Vision-Centric Transformer, CVPR 2025), the third network family: frames + audio + maskiges -> class and
mask logits per query and frame, and the audio/prototype embeddings of its PAC loss (docs/model.md, 'VCT').

VCT is a fork of COMBO. Shared with COMBO and AV2TS, one implementation each: the Siam encoder and its gates
(model/backbone.py, here with Swin backbones: ``SwinFeatures``), the frozen VGGish (model/vggish.py, here without
its linear layers: VCT reads the conv map), the audio MLP (model/bilateral_fusion.py ``AudioMlp``, here applied per
audio token), the deformable pixel decoder with its input projections (model/pixel_decoder.py, as COMBO), the
masked-attention decoder and its heads (model/decoder.py, here over 4 memory levels, the audio tokens unmasked),
the input checks and normalisation (``AV2TS``). VCT's own (this file): the vision-derived queries (``VisionQueries``:
ProtoVCQ with prototypes for S4/AVSS, VCQ without for MS3), the prototype alignment of the PAC loss
(``PrototypeAlignment``) and ``segment``'s resize to the reference's 224 px output.

Top-level parts and the reference (spyflying/VCT_AVS ``VCT``) state-dict prefixes they replace, one tensor for one
tensor apart from the Swin buffers (the converter is ``weights/convert_vct.py``):

==========================  ==========================================================================
ours                        reference
==========================  ==========================================================================
``backbone.``               ``backbone.`` (D2SwinTransformer; patch merging one stage later, ``norm0..2`` ->
                            ``stage_norms.{0..2}``, ``norm3`` -> ``norm``, ``relative_position_index`` dropped:
                            timm rebuilds it as a non-persistent buffer)
``siam_backbone.``          ``pre_sam_backbone.`` (the same)
``siam_gates.gates.{l}.``   ``scale_factor_module.{l}.``
``audio_encoder.``          ``audio_backbone.features.`` (``audio_backbone.embeddings.*`` dropped: built and
                            loaded by the reference, never run; 67,641,472 parameters)
``audio_mlp.layers.``       ``sem_seg_head.audio_transformation.embeddings.``
``pixel_decoder.``          ``sem_seg_head.pixel_decoder.`` (as COMBO)
``queries.``                ``sem_seg_head.predictor.visual_query_block.``
``decoder.``                ``sem_seg_head.predictor.`` (the Mask2Former layers and heads)
``alignment.``              ``sem_seg_head.predictor.{audio_proj,proto_proj}``, ``criterion.logit_scale``
(criterion, separate)       ``criterion.empty_weight`` (a constant of the loss, dropped)
==========================  ==========================================================================

Frames are processed frame-major: row ``b*T + t`` of every [B*T, ...] tensor is frame t of clip b. Every operation
after the inputs is per frame (no frame sees another), so a clip gives the same result alone or batched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.config import ModelConfig
from av2ts_cli.model.av2ts import AV2TS
from av2ts_cli.model.bilateral_fusion import AudioMlp
from av2ts_cli.model.decoder import MaskedAttentionDecoder, MultiHeadAttention
from av2ts_cli.model.pixel_decoder import PixelDecoder
from av2ts_cli.model.vggish import VGGish

MEMORY_LEVELS = 4  # the decoder reads the audio tokens, then the pixel decoder's strides 32, 16, 8, in turn
AUDIO_LEVEL = 0  # ... the audio tokens are level 0 and are never masked (they are no image grid)
PROTOTYPE_HEADS = 4  # heads of the queries' cross-attention to the prototypes (the reference's fixed 4)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # PAC similarity temperature, learnable (CLIP's initial value)
RELEASE_VGGISH_WIDTHS = (64, 128, 256, 256, 512, 512)  # the reference's VGGish (vggish-10086976.pth)


class AssignAttention(nn.Module):
    """GroupViT's hard assignment, one head: every pixel is assigned to the query it matches best, and each query
    receives the mean value of its pixels (over count + 1, so a query with no pixel gets zero before ``proj``).

    logits = q_proj(queries) . k_proj(pixels) / sqrt(C), softmax over the *queries*, then the straight-through
    one-hot of the arg-max (forward: exactly one-hot up to rounding; backward: the softmax's gradient). In
    training Gumbel noise (temperature ``tau``) is added to the logits first, as the reference does.
    """

    def __init__(self, dim: int, tau: float = 1.0):
        super().__init__()
        self.scale, self.tau = dim ** -0.5, tau
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """queries: [N, Q, C]; pixels: [N, P, C] -> [N, Q, C] (what is added to the queries)."""
        logits = self.q_proj(queries) @ self.k_proj(pixels).transpose(1, 2) * self.scale  # [N, Q, P]
        if self.training:  # Gumbel(0, 1) noise: -log(Exp(1))
            logits = (logits - torch.empty_like(logits).exponential_().log()) / self.tau
        soft = logits.softmax(dim=1)
        hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
        assign = hard - soft.detach() + soft  # the reference's straight-through form, values included
        assign = assign / (assign.sum(dim=-1, keepdim=True) + 1.0)
        return self.proj(assign @ self.v_proj(pixels))


class PixelMixer(nn.Module):
    """A 3-layer MLP over the pixel axis, P -> C -> C -> Q with ReLU between: one query per output, each a learnt
    mixture of all pixels (this is what ties VCT to one input size: P = (input/4)^2)."""

    def __init__(self, num_pixels: int, dim: int, num_queries: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(num_pixels, dim), nn.Linear(dim, dim), nn.Linear(dim, num_queries)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., P] -> [..., Q]."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class VisionQueries(nn.Module):
    """The query generator (ProtoVCQ with ``num_prototypes`` > 0, VCQ without): mask features [N, C, h, w] ->
    (queries [N, Q, C], prototypes [K, C] or None).

    1. ``pre_proj``: 1x1 conv, ReLU, 3x3 conv, ReLU, 1x1 conv (all C wide, with bias) -> pixels x [N, C, h*w].
    2. ``query_mixer``: MLP over the pixel axis -> [N, C, Q], i.e. Q queries of width C.
    3. ProtoVCQ: the queries attend to the learnt prototypes (4 heads, no position terms), residual, LayerNorm
       (post-norm, as the decoder's layers).
    4. ``assign``: queries += AssignAttention(queries, pixels).
    """

    def __init__(self, dim: int, num_pixels: int, num_queries: int, num_prototypes: int = 0):
        super().__init__()
        self.num_pixels = num_pixels
        self.pre_proj = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(dim, dim, 1))
        self.query_mixer = PixelMixer(num_pixels, dim, num_queries)
        if num_prototypes:
            self.prototypes = nn.Embedding(num_prototypes, dim)
            self.prototype_attn = MultiHeadAttention(dim, PROTOTYPE_HEADS)
            self.prototype_norm = nn.LayerNorm(dim)
            nn.init.xavier_uniform_(self.prototype_attn.out_proj.weight)  # the reference's init of the layer
        self.assign = AssignAttention(dim)

    def forward(self, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mask_features: [N, C, h, w] with h*w = ``num_pixels`` -> (queries [N, Q, C], prototypes [K, C] or
        None)."""
        n, c, h, w = mask_features.shape
        if h * w != self.num_pixels:
            raise ValueError(f"the query generator mixes {self.num_pixels} pixels of mask features; got a {h}x{w} "
                             "map (VCT runs at its config's input_size only)")
        pixels = self.pre_proj(mask_features).flatten(2)  # [N, C, P]
        queries = self.query_mixer(pixels).transpose(1, 2)  # [N, C, Q] -> [N, Q, C]
        prototypes = None
        if hasattr(self, "prototypes"):
            prototypes = self.prototypes.weight  # [K, C], the same for every frame
            memory = prototypes.unsqueeze(0).expand(n, -1, -1)
            queries = self.prototype_norm(queries + self.prototype_attn(queries, memory, memory))
        return queries + self.assign(queries, pixels.transpose(1, 2)), prototypes


class PrototypeAlignment(nn.Module):
    """What the PAC loss reads (training only): L2-normalised projections of the frame's mean audio token and of
    the prototypes, and their similarity scaled by exp(``logit_scale``) (learnable, as in the reference, whose
    criterion holds it). The loss is a BCE of ``logits`` against the S4 category (one-hot) or the AVSS classes
    present in the frame (multi-hot)."""

    def __init__(self, dim: int):
        super().__init__()
        self.audio_proj = nn.Linear(dim, dim, bias=False)
        self.proto_proj = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        for proj in (self.audio_proj, self.proto_proj):
            nn.init.normal_(proj.weight, std=dim ** -0.5)

    def forward(self, audio_tokens: torch.Tensor, prototypes: torch.Tensor) -> dict[str, torch.Tensor]:
        """audio_tokens: [N, C, 6, 4]; prototypes: [K, C] -> {"audio": [N, C], "prototypes": [N, K, C] (unit
        vectors), "logits": [N, K] = exp(logit_scale) * cosine similarity}."""
        audio = F.normalize(self.audio_proj(audio_tokens.mean(dim=(2, 3))), dim=-1, eps=0.0)
        protos = F.normalize(self.proto_proj(prototypes), dim=-1, eps=0.0)
        logits = self.logit_scale.exp() * audio @ protos.t()
        return {"audio": audio, "prototypes": protos.unsqueeze(0).expand(audio.shape[0], -1, -1), "logits": logits}


class VCT(AV2TS):
    """The VCT network for a ``ModelConfig`` with ``family="vct"`` (presets vct-swinb, vct-tiny)."""

    # no operation mixes the frames of a clip (see the module docstring): a training step may run the supervised
    # frames alone (training.optim.supervised_frames), the same losses and gradients
    frames_independent = True

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)  # not AV2TS.__init__: only its checks and normalisation are shared
        if cfg.family != "vct":
            raise ValueError(f"model config {cfg.preset!r} is of family {cfg.family!r}, not vct")
        if cfg.input_size % 4:
            raise ValueError(f"VCT needs an input size divisible by 4, got {cfg.input_size}")
        self.cfg = cfg
        dim = cfg.hidden_dim
        channels = self._build_visual_encoders(cfg)
        self.audio_encoder = VGGish(cfg.vggish_widths, embeddings=False)
        self.audio_encoder.requires_grad_(False)  # frozen: never trained, run under no_grad
        self.audio_mlp = AudioMlp(cfg.vggish_widths[-1], cfg.audio_mlp_dim, dim)
        self.pixel_decoder = PixelDecoder(dim, cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_points,
                                          cfg.encoder_ffn_dim, in_channels=channels)
        side = cfg.input_size // 4  # the mask features' side: the query generator is built for it
        self.queries = VisionQueries(dim, side * side, cfg.num_queries, cfg.num_prototypes)
        self.decoder = MaskedAttentionDecoder(dim, cfg.num_classes, cfg.num_queries, cfg.decoder_layers,
                                              cfg.decoder_heads, cfg.decoder_ffn_dim, MEMORY_LEVELS,
                                              unmasked_levels=(AUDIO_LEVEL,))
        if cfg.num_prototypes:
            self.alignment = PrototypeAlignment(dim)
        self._register_pixel_statistics()

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None) -> dict:
        """frames: [B, T, 3, S, S] RGB 0..255 with S = ``cfg.input_size`` (384; the query generator's pixel MLP
        admits no other size); audio: [B, T, 96, 64] log-mel examples, one per frame; maskiges: [B, T, 3, S, S]
        RGB 0..255, required iff the config has the Siam encoder. AVSS: pass the real frames only (the reference
        drops the padding rows of a v1s/v1m clip before its audio encoder).

        Returns {"pred_logits": [B*T, Q, K+1], "pred_masks": [B*T, Q, S/4, S/4], "aux_outputs": list of the
        earlier {"pred_logits", "pred_masks"} (decoder_layers of them), "middle_masks": list of [B*T, Q, S/4 *
        S/4] (for AV2TS's cosine loss; VCT trains without it)} (frame-major rows), and with prototypes (S4, AVSS)
        "pac": ``PrototypeAlignment``'s {"audio" [B*T, C], "prototypes" [B*T, K_p, C], "logits" [B*T, K_p]}.
        """
        self._check_inputs(frames, audio, maskiges)
        if tuple(frames.shape[-2:]) != (self.cfg.input_size,) * 2:
            raise ValueError(f"VCT model {self.cfg.preset} takes {self.cfg.input_size}x{self.cfg.input_size} frames "
                             f"(its query generator is built for that size), got {list(frames.shape)}")
        features = self.backbone(self._normalise(frames))
        if self.cfg.siam:
            features = self.siam_gates(features, self.siam_backbone(self._normalise(maskiges)))

        with torch.no_grad():
            conv = self.audio_encoder(audio.flatten(0, 1).unsqueeze(1).float())  # [B*T, 512, 6, 4]
        # 24 audio tokens per frame (6 time steps x 4 mel groups), each through the MLP on its own: [B*T, C, 6, 4]
        tokens = self.audio_mlp(conv.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        mask_features, memories = self.pixel_decoder(features)  # [B*T, C, S/4, S/4], strides 32, 16, 8
        queries, prototypes = self.queries(mask_features)  # [B*T, Q, C], [K_p, C] or None
        out = self.decoder([tokens] + memories, queries, mask_features)
        if prototypes is not None:
            out["pac"] = self.alignment(tokens, prototypes)
        return out

    def reference_only_parameters(self) -> dict[str, int]:
        """{what: parameters} that the reference builds and loads but never runs and this network leaves out:
        VGGish's three linear layers (the release's 128-d embedding after hidden layers of ``cfg.vggish_hidden``;
        67,641,472 for vct-swinb). ``av2ts info --model`` adds them to state the reference's count. Empty for a
        config whose VGGish is not the release's (vct-tiny: no reference network has its widths)."""
        if tuple(self.cfg.vggish_widths) != RELEASE_VGGISH_WIDTHS:
            return {}
        with torch.device("meta"):
            linear = VGGish(self.cfg.vggish_widths, self.cfg.vggish_hidden).embeddings
        count = sum(p.numel() for p in linear.parameters())
        return {"VGGish's linear layers, loaded by the reference but never run": count}

    def segment(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Semantic maps [B, T, K, R, R], R = ``cfg.output_size`` (224 for vct-swinb; the input size when 0), as the
        reference's test loop makes them: masks upsampled bilinearly to the input size, the sum over queries of
        softmax(class)[:K] times sigmoid(mask) at that size, then the map resized bilinearly to R (the reference
        fixes 224 px "for fair comparison with other 224x224 methods"). Run it under the caller's
        ``torch.no_grad()`` / ``torch.inference_mode()``."""
        b, t = frames.shape[:2]
        out = self(frames, audio, maskiges)
        size = self.cfg.output_size or self.cfg.input_size
        with torch.autocast(frames.device.type, enabled=False):  # float32 from here, also under autocast
            probs = out["pred_logits"].float().softmax(-1)[..., :-1]  # [N, Q, K]: the no-object class dropped
            masks = out["pred_masks"]  # [N, Q, S/4, S/4]
            maps = []
            for i in range(masks.shape[0]):  # one frame at a time: N x Q full-size masks would be large
                full = F.interpolate(masks[i:i + 1].float(), size=frames.shape[-2:], mode="bilinear",
                                     align_corners=False).sigmoid_()
                semseg = torch.einsum("nqk,nqhw->nkhw", probs[i:i + 1], full)  # [1, K, S, S]
                if semseg.shape[-1] != size:
                    semseg = F.interpolate(semseg, size=(size, size), mode="bilinear", align_corners=False)
                maps.append(semseg)
        semseg = torch.cat(maps)
        return semseg.reshape(b, t, *semseg.shape[1:])
