"""Model configuration: one dataclass, named presets, JSON round trip.

A preset is a network (``av2ts-r50``, ``av2ts-pvt``, ``av2ts-tiny``) crossed with a subset (``s4`` and ``ms3``: 2
classes, background and sounding object; ``avss``: 71 classes) and the Siam encoder on or off. The reference
presets are the AV2TS configs of docs/model.md, 'Training' (Siam encoder on); ``av2ts-tiny`` is the same architecture
scaled down so that it trains from scratch on a CPU in minutes (tests, the demo model).

This module is also the network's only window on the rest of the package (``model/`` imports torch, timm, numpy,
scipy, the standard library, ``config`` and itself): it re-exports the AVSBench contract values the network needs
and defines the cache root that the kernel build and the app share.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The contract values the network needs, re-exported for model/ (whose only window on the package this module is):
# the log-mel example (VGGish recipe, see model/audio.py: 96 frames x 64 mel bands of 16 kHz audio, 0.96 s) and the
# classes per subset. They are defined in avsbench.py.
from av2ts_cli.avsbench import EXAMPLE_FRAMES, MEL_BANDS, SAMPLE_RATE, SUBSET_CLASSES
from av2ts_cli.errors import UsageError

__all__ = ["EXAMPLE_FRAMES", "MEL_BANDS", "PRESET_NAMES", "SAMPLE_RATE", "SUBSET_CLASSES",
           "LossConfig", "ModelConfig", "cache_root", "get_preset"]

AUDIO_STAGES = 4  # CED tokens + the three temporal blocks: each stage gives one set of audio queries
FAMILIES = ("av2ts", "combo", "vct", "avsegformer")  # the top-level networks av2ts builds (ModelConfig.family)
S4_CATEGORIES = 23  # the S4 sound categories (VCT's S4 prototypes, one per category)


@dataclass
class LossConfig:
    """Weights and sampling of the training criterion (docs/model.md, 'Losses'; the reference values by default)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    cosine_weight: float = 10.0  # inter-frame consistency loss on the middle masks
    prototype_weight: float = 1.0  # VCT's PAC term (networks with prototypes only: training/criterion_vct.py)
    no_object_weight: float = 0.1
    num_points: int = 12544  # points sampled per mask for the matcher and the mask losses
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass
class ModelConfig:
    """Everything needed to build an AV2TS network (``av2ts_cli.model.build_model``)."""

    preset: str = "av2ts-r50"
    family: str = "av2ts"  # av2ts | combo | vct: which top-level network (model/av2ts.py, combo.py, vct.py) builds
    # (or avsegformer: model/avsegformer.py)
    subset: str = "s4"  # s4 | ms3 | avss
    num_classes: int = 2  # K, background included (the no-object class is extra)
    num_frames: int = 5  # T, frames per clip (the window); the network itself accepts any T
    input_size: int = 224  # square side the frames are resized to, a multiple of 32
    siam: bool = True  # Siam encoder: a second backbone on the maskiges, gated into the visual features

    # visual backbone: a timm model with features at strides 4, 8, 16, 32
    backbone: str = "resnet50"
    backbone_out_indices: tuple[int, ...] = (1, 2, 3, 4)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm create_model arguments
    frozen_bn: bool = True  # detectron2 FrozenBN (pretrained backbones); False trains BatchNorm as usual
    drop_path_rate: float = 0.0  # stochastic depth, linear over the backbone's blocks
    siam_gate_reduction: int = 16  # SE gate width C/r

    # audio encoder: CED (frozen), fed with one log-mel example per frame
    audio_dim: int = 256
    audio_depth: int = 12
    audio_heads: int = 4
    audio_patch: int = 16
    audio_max_frames: int = 1012  # CED's target length: the time position table has audio_max_frames // patch rows

    # DSTA: temporal acoustic attention (three blocks) and temporal visual attention (shared map)
    temporal_heads: int = 8

    hidden_dim: int = 256  # width of everything after the backbones

    # COMBO only (family "combo", docs/model.md 'COMBO'): frozen VGGish (its output width is audio_dim, 128),
    # bilateral fusion with audio_dim-wide audio, an audio MLP to hidden_dim, learned queries
    vggish_widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512)  # the six 3x3 convs
    vggish_hidden: int = 4096  # the two hidden linear layers of VGGish
    audio_mlp_dim: int = 4096  # hidden width of the audio MLP audio_dim -> 4096 -> 4096 -> hidden_dim
    object_queries: int = 100  # COMBO's learned queries (AV2TS has one per audio token: num_queries)

    # AVSegFormer only (family "avsegformer", model/avsegformer.py): frozen VGGish as COMBO's (audio_dim 128,
    # projected to hidden_dim), object_queries queries (300) from an audio query generator, the deformable encoder
    # (encoder_*), a plain transformer decoder (decoder_*), the mixer (fusion_heads) and a per-pixel head
    generator_layers: int = 6  # query generator: self-attention, cross-attention to the audio token, FFN
    generator_heads: int = 8
    generator_ffn_dim: int = 1024
    mask_mlp_dim: int = 2048  # hidden width of the 1x1-conv MLP from the Q query maps to hidden_dim channels
    transformer_dropout: float = 0.1  # AVSegFormer's encoder and decoder dropout (active in training only)

    # VCT only (family "vct", model/vct.py): VGGish's conv map as audio tokens (vggish_widths, audio_mlp_dim as
    # COMBO), object_queries vision-derived queries, prototypes for the query generator and the PAC loss
    num_prototypes: int = 0  # ProtoVCQ's prototypes (S4: 23 categories, AVSS: the 71 classes); 0: VCQ (MS3)
    output_size: int = 0  # side of the maps ``segment`` returns (the reference's test loop: 224); 0: input_size

    # pixel decoder: multi-scale deformable attention encoder on strides 8/16/32, FPN on stride 4
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_points: int = 4
    encoder_ffn_dim: int = 1024

    # one-stream audio-visual attention (OSA) on the 4x4 space-to-depth mask features
    fusion_blocks: int = 3
    fusion_heads: int = 8
    layer_scale_init: float = 1e-4

    # masked-attention transformer decoder
    decoder_layers: int = 12
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048

    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        self.backbone_out_indices = tuple(int(i) for i in self.backbone_out_indices)
        self.vggish_widths = tuple(int(i) for i in self.vggish_widths)
        self.backbone_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.backbone_kwargs.items()}
        if isinstance(self.loss, dict):
            self.loss = _from_fields(LossConfig, self.loss, "loss")
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.family == "avsegformer" and self.siam:
            problems.append("AVSegFormer has no Siam encoder (siam must be false)")
        if self.family == "avsegformer" and (self.generator_heads < 1 or self.hidden_dim % self.generator_heads):
            problems.append(f"generator_heads={self.generator_heads} does not divide the width {self.hidden_dim}")
        if len(self.vggish_widths) != 6:
            problems.append(f"vggish_widths must name the 6 VGGish convs (got {len(self.vggish_widths)})")
        if self.subset not in SUBSET_CLASSES:
            problems.append(f"subset {self.subset!r} is not one of {', '.join(SUBSET_CLASSES)}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be at least 1 (got {self.num_classes})")
        if self.num_frames < 1:
            problems.append(f"num_frames must be at least 1 (got {self.num_frames})")
        if self.input_size < 32 or self.input_size % 32:
            problems.append(f"input_size must be a positive multiple of 32 (got {self.input_size})")
        if len(self.backbone_out_indices) != 4:
            problems.append("backbone_out_indices must name 4 feature levels (strides 4, 8, 16, 32)")
        for name, heads, dim in (("temporal_heads", self.temporal_heads, self.audio_dim),
                                 ("temporal_heads", self.temporal_heads, self.hidden_dim),
                                 ("audio_heads", self.audio_heads, self.audio_dim),
                                 ("encoder_heads", self.encoder_heads, self.hidden_dim),
                                 ("fusion_heads", self.fusion_heads, self.hidden_dim),
                                 ("decoder_heads", self.decoder_heads, self.hidden_dim)):
            if heads < 1 or dim % heads:
                problems.append(f"{name}={heads} does not divide the width {dim}")
        if self.num_prototypes < 0 or self.output_size < 0:
            problems.append("num_prototypes and output_size must not be negative")
        if self.hidden_dim % 32:
            problems.append(f"hidden_dim must be a multiple of 32 for GroupNorm(32) (got {self.hidden_dim})")
        if MEL_BANDS % self.audio_patch or EXAMPLE_FRAMES % self.audio_patch:
            problems.append(f"audio_patch {self.audio_patch} must divide the {EXAMPLE_FRAMES}x{MEL_BANDS} example")
        if problems:
            raise UsageError(f"model config {self.preset!r}: " + "; ".join(problems))

    @property
    def audio_tokens(self) -> int:
        """CED tokens per log-mel example: (64 / patch) frequency rows x (96 / patch) time columns (24)."""
        return (MEL_BANDS // self.audio_patch) * (EXAMPLE_FRAMES // self.audio_patch)

    @property
    def num_queries(self) -> int:
        """AV2TS: one query per audio token of each of the 4 audio stages (96 in the reference); COMBO and VCT:
        ``object_queries`` (100).
        AVSegFormer: its ``object_queries`` audio-generated queries (300)."""
        if self.family in ("combo", "vct", "avsegformer"):
            return self.object_queries
        return AUDIO_STAGES * self.audio_tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``ModelConfig.from_dict`` inverts it exactly."""
        d = dataclasses.asdict(self)
        d["backbone_out_indices"] = list(self.backbone_out_indices)
        d["vggish_widths"] = list(self.vggish_widths)
        d["backbone_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone_kwargs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild a config from ``to_dict`` output. Fields missing from ``d`` come from its named preset
        (so a config written by an older av2ts still loads); unknown fields are an error."""
        d = dict(d)
        preset = d.get("preset")
        if preset in PRESET_NAMES:
            base = get_preset(preset, d.get("subset", "s4"), d.get("siam")).to_dict()
            loss = {**base.pop("loss"), **(d.pop("loss", None) or {})}
            d = {**base, **d, "loss": loss}
        return _from_fields(cls, d, "model config")


def _from_fields(cls, d: dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UsageError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return cls(**d)


def _r50(subset: str, siam: bool) -> ModelConfig:
    return ModelConfig(preset="av2ts-r50", subset=subset, num_classes=SUBSET_CLASSES[subset], siam=siam)


def _pvt(subset: str, siam: bool) -> ModelConfig:
    # PVT-v2-b5: embed dims 64/128/320/512, depths 3/6/40/3, drop path 0.1 (docs/model.md, 'Visual backbones')
    return ModelConfig(preset="av2ts-pvt", subset=subset, num_classes=SUBSET_CLASSES[subset], siam=siam,
                       backbone="pvt_v2_b5", backbone_out_indices=(0, 1, 2, 3), frozen_bn=False, drop_path_rate=0.1)


def _tiny(subset: str, siam: bool) -> ModelConfig:
    """The reference architecture scaled down to 2.6 M parameters (3.9 M with the Siam encoder; fp32 checkpoints
    of 10.6 and 15.7 MB).

    Same parts and wiring; smaller widths and fewer layers: a half-width ResNet-10 (timm ResNet, BasicBlock, one
    block per stage, channels 32/64/128/256) with trainable BatchNorm, a 4-layer 64-wide CED of the same structure
    (patch 16, 24 tokens per example, so still 96 queries), hidden width 64, 2 deformable encoder layers, 3 OSA
    blocks, 4 decoder layers (one pass over the four memory levels) and a 128 px input.
    """
    return ModelConfig(
        preset="av2ts-tiny", subset=subset, num_classes=SUBSET_CLASSES[subset], siam=siam, input_size=128,
        backbone="resnet18", backbone_out_indices=(1, 2, 3, 4),
        backbone_kwargs={"layers": (1, 1, 1, 1), "channels": (32, 64, 128, 256), "stem_width": 32},
        frozen_bn=False, siam_gate_reduction=8,
        audio_dim=64, audio_depth=4, audio_heads=4,
        temporal_heads=8, hidden_dim=64,
        encoder_layers=2, encoder_heads=8, encoder_points=4, encoder_ffn_dim=256,
        fusion_blocks=3, fusion_heads=8,
        decoder_layers=4, decoder_heads=8, decoder_ffn_dim=512,
        loss=LossConfig(num_points=1024),  # ~ one point per pixel of its 32x32 masks,
    )


def _combo(base, preset: str, subset: str, siam: bool, **changes) -> ModelConfig:
    """COMBO (CVPR 2024) on the visual side of an AV2TS preset ``base``: VGGish audio (128-d), bilateral fusion,
    100 queries, 9 decoder layers over 3 memory levels (docs/model.md, 'COMBO')."""
    cfg = dataclasses.replace(base(subset, siam), preset=preset, family="combo", audio_dim=128,
                              decoder_layers=9, object_queries=100)
    return dataclasses.replace(cfg, **changes)


def _combo_r50(subset: str, siam: bool) -> ModelConfig:
    return _combo(_r50, "combo-r50", subset, siam)


def _combo_pvt(subset: str, siam: bool) -> ModelConfig:
    return _combo(_pvt, "combo-pvt", subset, siam)


def _combo_tiny(subset: str, siam: bool) -> ModelConfig:
    """COMBO's wiring on av2ts-tiny's visual side (half-width ResNet-10, hidden 64, 2 encoder layers, 128 px),
    with a narrow VGGish (convs 8..64, hidden 128, 32-d output; the reference's is 72 M parameters), a 128-wide
    audio MLP, 16 queries and 3 decoder layers (one pass over the three memory levels)."""
    return _combo(_tiny, "combo-tiny", subset, siam, audio_dim=32, vggish_widths=(8, 16, 32, 32, 64, 64),
                  vggish_hidden=128, audio_mlp_dim=128, object_queries=16, decoder_layers=3)


def _vct_prototypes(subset: str) -> int:
    """VCT's query generator per subset: ProtoVCQ with one prototype per S4 category (S4) or per class (AVSS),
    VCQ without prototypes (MS3)."""
    return {"s4": S4_CATEGORIES, "ms3": 0}.get(subset, SUBSET_CLASSES[subset])


def _vct_swinb(subset: str, siam: bool) -> ModelConfig:
    """VCT (CVPR 2025, docs/model.md 'VCT'): two Swin-B-384 (frames, maskiges; drop path 0.3), 384 px input and
    maps resized to 224 px, VGGish's conv map as 24 audio tokens (MLP 512 -> 4096 -> 4096 -> 256), 100 vision-derived
    queries, 9 decoder layers over the audio tokens and 3 scales; no cosine loss."""
    return ModelConfig(
        preset="vct-swinb", family="vct", subset=subset, num_classes=SUBSET_CLASSES[subset], siam=siam,
        input_size=384, output_size=224, backbone="swin_base_patch4_window12_384", backbone_out_indices=(0, 1, 2, 3),
        backbone_kwargs={"always_partition": True}, frozen_bn=False, drop_path_rate=0.3,
        object_queries=100, decoder_layers=9, num_prototypes=_vct_prototypes(subset),
        loss=LossConfig(cosine_weight=0.0))


def _vct_tiny(subset: str, siam: bool) -> ModelConfig:
    """VCT's wiring scaled down for tests and CPUs: a 128 px input (so a 32x32 mask-feature map and a 1024-input
    pixel MLP in the query generator) and maps at 128 px, a Swin of widths 32/64/128/256 (2 blocks per stage, so
    shifted windows too; window 4 divides every stage's grid, 32..4), hidden width 64, COMBO-tiny's narrow VGGish
    (conv map [64, 6, 4]) and 128-wide audio MLP, 2 deformable encoder layers, 16 queries and 4 decoder layers
    (one pass over the four memory levels)."""
    return dataclasses.replace(
        _vct_swinb(subset, siam), preset="vct-tiny", input_size=128, output_size=0,
        backbone="swin_tiny_patch4_window7_224",
        backbone_kwargs={"img_size": 128, "window_size": 4, "embed_dim": 32, "depths": (2, 2, 2, 2),
                         "num_heads": (1, 2, 4, 8), "always_partition": True},
        drop_path_rate=0.0, siam_gate_reduction=8, hidden_dim=64, vggish_widths=(8, 16, 32, 32, 64, 64),
        audio_mlp_dim=128, encoder_layers=2, encoder_ffn_dim=256, object_queries=16, decoder_layers=4,
        decoder_ffn_dim=512, loss=LossConfig(cosine_weight=0.0, num_points=1024))


def _avsegformer(base, preset: str, subset: str, siam: bool, **changes) -> ModelConfig:
    """AVSegFormer (AAAI 2024, vvvb-github/AVSegFormer at 7083cb6) on the visual backbone of an AV2TS preset
    ``base``: frozen VGGish (128-d) projected to 256, 300 queries from a 6-layer audio query generator, a 6-layer
    deformable encoder (FFN 2048, GELU) on strides 8/16/32, a 6-layer decoder, the cross-modal mixer and a per-pixel
    head. Input as the reference's loaders: 512 px for S4/MS3 (5 frames), 224 px for AVSS (10). There is no Siam
    encoder: ``siam`` is ignored (the config always says False, and ``ModelConfig`` refuses True for this family)."""
    del siam
    avss = subset == "avss"
    cfg = dataclasses.replace(base(subset, False), preset=preset, family="avsegformer", siam=False,
                              input_size=224 if avss else 512, num_frames=10 if avss else 5,
                              audio_dim=128, object_queries=300, encoder_ffn_dim=2048, decoder_layers=6)
    return dataclasses.replace(cfg, **changes)


def _avsegformer_r50(subset: str, siam: bool) -> ModelConfig:
    # the reference's ResNet-50 trains its BatchNorm (statistics included), unlike AV2TS's detectron2 FrozenBN
    return _avsegformer(_r50, "avsegformer-r50", subset, siam, frozen_bn=False)


def _avsegformer_pvt(subset: str, siam: bool) -> ModelConfig:
    return _avsegformer(_pvt, "avsegformer-pvt", subset, siam)


def _avsegformer_tiny(subset: str, siam: bool) -> ModelConfig:
    """AVSegFormer's wiring on av2ts-tiny's visual side (half-width ResNet-10 with trainable BatchNorm, hidden 64) at
    128 px for every subset, with combo-tiny's narrow VGGish (32-d output), 16 queries, 2 generator / encoder /
    decoder layers, narrow FFNs and a 64-wide mask MLP."""
    return _avsegformer(_tiny, "avsegformer-tiny", subset, siam, input_size=128, num_frames=5, audio_dim=32,
                        vggish_widths=(8, 16, 32, 32, 64, 64), vggish_hidden=128, object_queries=16,
                        generator_layers=2, generator_ffn_dim=128, encoder_layers=2, encoder_ffn_dim=256,
                        decoder_layers=2, decoder_ffn_dim=256, mask_mlp_dim=64)


_PRESETS = {"av2ts-r50": (_r50, True), "av2ts-pvt": (_pvt, True), "av2ts-tiny": (_tiny, False),
            "combo-r50": (_combo_r50, True), "combo-pvt": (_combo_pvt, True), "combo-tiny": (_combo_tiny, False),
            "vct-swinb": (_vct_swinb, True), "vct-tiny": (_vct_tiny, False),
            "avsegformer-r50": (_avsegformer_r50, False), "avsegformer-pvt": (_avsegformer_pvt, False),
            "avsegformer-tiny": (_avsegformer_tiny, False)}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str, subset: str = "s4", siam: bool | None = None) -> ModelConfig:
    """The named preset for a subset; ``siam=None`` keeps the preset's default (on for r50/pvt, off for tiny)."""
    if name not in _PRESETS:
        raise UsageError(f"unknown model preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    if subset not in SUBSET_CLASSES:
        raise UsageError(f"unknown subset {subset!r}; choose from {', '.join(SUBSET_CLASSES)}")
    build, default_siam = _PRESETS[name]
    return build(subset, default_siam if siam is None else bool(siam))


def cache_root() -> Path:
    """The root of av2ts's caches (kernel builds, log-mel examples): $AV2TS_CACHE, else $XDG_CACHE_HOME/av2ts, else
    ~/.cache/av2ts. Defined here, below both the network (``model.ops.build``) and the app, so that both read it."""
    base = os.environ.get("AV2TS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "av2ts")
    return Path(base).expanduser()
