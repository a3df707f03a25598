"""Importing the AV2TS family's upstream files: the reference implementation's checkpoints and the parts AV2TS is
initialised from (rename rules from docs/model.md, "Checkpoints and the reference key mapping").

- ``--kind reference``: a checkpoint trained with the reference code (OrigamiSL/AV2TS on detectron2), a torch file
  ``{"model": state_dict}`` -> a full av2ts checkpoint (preset, classes and Siam encoder read from its keys);
- ``--kind detectron2``: the backbone pickles ``R-50.pkl`` / ``d2_pvt_v2_b5.pkl`` -> the visual backbone and the
  Siam encoder (both from the same file, as the reference does) of a new or given checkpoint;
- ``--kind ced`` / ``ced-hf``: CED-Mini from ``audiotransformer_mini_mAP_4896.pt`` (Zenodo) or from the
  transformers conversion ``hf://mispeech/ced-mini`` -> the audio encoder.

The backbone rules (detectron2 ResNet, PVT-v2) and the decoder rules are shared with COMBO (``convert_combo.py``).
"""

from __future__ import annotations

from av2ts_cli.errors import UsageError
from av2ts_cli.weights.mapping import (
    ARCH_PRESET,
    backbone_of,
    config_from_keys,
    conversion_meta,
    conversion_target,
    converter_input,
    fill_model,
    map_state_dict,
    read_state_dict_file,
)
from av2ts_cli.weights.rules import DECODER_RULES, PIXEL_DECODER_RULES, Rule, stage

AV2TS_KINDS = ("reference", "detectron2", "ced", "ced-hf")

_FC_DROPPED = "ImageNet classifier, not part of a feature extractor"

# detectron2 ResNet (torchvision converted with detectron2's convert-torchvision-to-d2.py) -> timm resnet
D2_RESNET_RULES = [
    Rule(r"(stem\.)?fc\.", None, _FC_DROPPED),
    Rule(r"stem\.conv1\.norm\.", "bn1."),
    Rule(r"stem\.conv1\.", "conv1."),
    Rule(r"res([2-5])\.(\d+)\.conv([1-3])\.norm\.", stage(-1, "layer{}.{}.bn{}.")),
    Rule(r"res([2-5])\.(\d+)\.conv([1-3])\.", stage(-1, "layer{}.{}.conv{}.")),
    Rule(r"res([2-5])\.(\d+)\.shortcut\.norm\.", stage(-1, "layer{}.{}.downsample.1.")),
    Rule(r"res([2-5])\.(\d+)\.shortcut\.", stage(-1, "layer{}.{}.downsample.0.")),
]

# original PVT-v2 names (d2_pvt_v2_b5.pkl and the reference backbone) -> timm pvt_v2 (timm's own remap, restated)
PVT_RULES = [
    Rule(r"head\.", None, _FC_DROPPED),
    Rule(r"patch_embed1\.", "patch_embed."),
    Rule(r"patch_embed([2-4])\.", stage(-1, "stages.{}.downsample.")),
    Rule(r"block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.", stage(-1, "stages.{}.blocks.{}.mlp.dwconv.")),
    Rule(r"block([1-4])\.(\d+)\.", stage(-1, "stages.{}.blocks.{}.")),
    Rule(r"norm([1-4])\.", stage(-1, "stages.{}.norm.")),
]

# CED-Mini (RicherMans/CED AudioTransformer state dict) -> av2ts CEDEncoder
CED_RULES = [
    Rule(r"front_end\.", None, "CED's own mel front end; AV2TS feeds VGGish log-mel examples"),
    Rule(r"outputlayer\.", None, "AudioSet classification head, unused by AV2TS"),
    Rule(r"init_bn\.1\.", "init_bn."),
    Rule(r"patch_embed\.proj\.", "patch_embed."),
    Rule(r"(time_pos_embed|freq_pos_embed|blocks\.|norm\.)", r"\1"),
]

# the transformers conversion on hf://mispeech/ced-mini (CedForAudioClassification): "encoder." + the CED names
# with "init_bn.1." shortened to "init_bn.", and the head "outputlayer." at the top level
CED_HF_RULES = [
    Rule(r"outputlayer\.", None, "AudioSet classification head, unused by AV2TS"),
    Rule(r"encoder\.init_bn\.", "init_bn."),
    Rule(r"encoder\.patch_embed\.proj\.", "patch_embed."),
    Rule(r"encoder\.(time_pos_embed|freq_pos_embed|blocks\.|norm\.)", r"\1"),
]

# reference (OrigamiSL/AV2TS MaskFormer) -> av2ts, after the backbone / CED prefixes (see model/av2ts.py)
_PIXEL = r"sem_seg_head\.pixel_decoder\."
_FUSION = r"sem_seg_head\.fusion_module\."
REFERENCE_RULES = [
    Rule(r"criterion\.", None, "a constant of the loss (no-object weight), rebuilt from the config"),
    Rule(_PIXEL + r"input_proj\.", None, "built by the reference pixel decoder but never used in its forward"),
    Rule(_PIXEL + r"linear1\.", None, "built by the reference pixel decoder but never used in its forward"),
    Rule(r"scale_factor_module\.(\d+)\.", r"siam_gates.gates.\1."),
    Rule(r"time_attn_blocks_([1-3])\.", stage(-1, "acoustic_attention.blocks.{}.")),
    Rule(r"time_norm\.", "acoustic_attention.norm."),
    Rule(r"audio_linear([1-4])\.", stage(-1, "acoustic_attention.projections.{}.")),
    Rule(r"visual_project\.(\d+)\.", r"visual_attention.projections.\1."),
    Rule(r"time_visual_attn_blocks\.(\d+)\.", r"visual_attention.blocks.\1."),
    Rule(r"time_visual_norm\.(\d+)\.", r"visual_attention.norms.\1."),
    *PIXEL_DECODER_RULES,
    Rule(_FUSION + r"(audio_pos|level_embed)\.", r"fusion.\1."),
    Rule(_FUSION + r"conv_proj_1\.", "fusion.reduce."),
    Rule(_FUSION + r"b_attn\.layer_norm_v_list\.0\.", "fusion.norm_visual."),
    Rule(_FUSION + r"b_attn\.layer_norm_a_list\.0\.", "fusion.norm_audio."),
    Rule(_FUSION + r"b_attn\.attn_list\.0\.attn_block\.(\d+)\.", r"fusion.blocks.\1."),
    Rule(_FUSION + r"b_attn\.attn_list\.0\.norm\.", "fusion.norm."),
    Rule(_FUSION + r"b_attn\.gamma_v_list\.0$", "fusion.gamma_visual"),
    Rule(_FUSION + r"b_attn\.gamma_a$", "fusion.gamma_audio"),
    *DECODER_RULES,
]

# where each group of source keys goes: (source prefix, av2ts prefix, inner rules)
_REFERENCE_PREFIXES = {
    "r50": [("backbone.", "backbone.", D2_RESNET_RULES), ("pre_sam_backbone.", "siam_backbone.", D2_RESNET_RULES),
            ("audio_backbone.", "audio_encoder.", CED_RULES)],
    "pvt": [("backbone.", "backbone.", PVT_RULES), ("pre_sam_backbone.", "siam_backbone.", PVT_RULES),
            ("audio_backbone.", "audio_encoder.", CED_RULES)],
}


def convert_av2ts_kind(source: str, kind: str, *, preset: str | None = None, subset: str | None = None,
            siam: bool | None = None, base: str | None = None):
    """Import an upstream weights file: ``(model, cfg, KeyMapping, meta)`` ready for ``save_checkpoint``.

    ``kind``: ``reference`` (a full AV2TS checkpoint of the reference code: everything is filled, the preset,
    classes and Siam encoder are read from its keys), ``detectron2`` (backbone pickle: the visual backbone and the
    Siam encoder), ``ced`` / ``ced-hf`` (CED-Mini: the audio encoder). Partial kinds fill a fresh model of
    ``preset`` (inferred from the file where possible) or the checkpoint ``base``; the rest keeps its values.
    """
    from av2ts_cli.model import build_model  # local: the network imports torch and timm

    if kind not in AV2TS_KINDS:
        raise UsageError(f"unknown AV2TS --kind {kind!r}; choose from {', '.join(AV2TS_KINDS)}")
    path = converter_input(source)
    state = read_state_dict_file(path)
    base_doc = None
    if kind == "reference":
        if base is not None:
            raise UsageError("--base does not apply to --kind reference: the checkpoint gives every tensor")
        arch, cfg = config_from_keys(state, path, preset, subset, siam, ARCH_PRESET, "an AV2TS reference")
        model = build_model(cfg)
        groups = [(src, dst, rules) for src, dst, rules in _REFERENCE_PREFIXES[arch]] + [("", "", REFERENCE_RULES)]
        required = [""]
        trained_on = f"unknown: converted from the reference-implementation checkpoint {path.name}"
    elif kind == "detectron2":
        arch = backbone_of(state, "", path)
        model, cfg, base_doc = conversion_target(arch, path, preset, subset, siam, base)
        rules = D2_RESNET_RULES if arch == "r50" else PVT_RULES
        required = ["backbone."] + (["siam_backbone."] if cfg.siam else [])
        groups = [("", prefix, rules) for prefix in required]
        trained_on = None
    else:
        model, cfg, base_doc = conversion_target(None, path, preset, subset, siam, base)
        groups = [("", "audio_encoder.", CED_RULES if kind == "ced" else CED_HF_RULES)]
        required = ["audio_encoder."]
        trained_on = None
    mapping = map_state_dict(state, groups, model.state_dict(), path)
    fill_model(model, mapping, required, path)
    return model.eval(), cfg, mapping, conversion_meta(kind, source, mapping, cfg.family, base_doc, trained_on)

