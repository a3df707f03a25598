"""Importing COMBO-AVS files (``av2ts convert --kind combo`` / ``--kind vggish``): the rename rules from the COMBO
reference's state-dict layout (yannqi/COMBO-AVS ``MaskFormer``, tests/data/combo-keys-*.tsv) to ``model/combo.py``.

- ``--kind combo``: a checkpoint written by the COMBO code, a detectron2 Checkpointer file
  ``{"model": state_dict, "trainer": {...}, "iteration": int}`` read with ``torch.load(weights_only=True)``. Only
  the model's tensors are kept; the other entries and the model's unused tensors are listed in the report, and a
  tensor of no known layout, one with no place in the av2ts model or a model tensor left unfilled is an error
  naming the keys. The backbone (ResNet-50 or PVT-v2-b5), the classes (3 logits: S4/MS3, 72: AVSS) and the Siam
  encoder (``pre_sam_backbone``) are read from the keys.
- ``--kind vggish``: the released VGGish weights (``pretrained/vggish-10086976.pth``, ``features.*`` and
  ``embeddings.*``) -> the audio encoder of a new COMBO model of ``--preset`` (combo-r50 by default) or of the
  checkpoint ``--base``, to train from pretrained parts as with ``--kind ced``.

The machinery (safe readers, ``Rule``, ``map_state_dict``, ``fill_model``) is ``mapping.py``'s; the backbone rules
and the decoder and pixel-decoder rules that COMBO shares with AV2TS are ``convert_av2ts.py``'s; this file adds only
what differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.weights.convert_av2ts import D2_RESNET_RULES, PVT_RULES, REFERENCE_RULES
from av2ts_cli.weights.mapping import (
    KeyMapping,
    config_from_keys,
    conversion_meta,
    conversion_target,
    converter_input,
    fill_model,
    map_state_dict,
    read_state_dict_file,
    read_torch_weights,
)
from av2ts_cli.weights.rules import PIXEL_INPUT_PROJ_RULE, Rule

COMBO_KINDS = ("combo", "vggish")

_PIXEL = r"sem_seg_head\.pixel_decoder\."
_FUSION = r"sem_seg_head\.fusion_module\."
# AV2TS rules that do not apply to COMBO: its pixel decoder uses input_proj (AV2TS drops it), it has no linear1,
# no temporal blocks and another fusion module
_AV2TS_ONLY = (_PIXEL + r"input_proj", _PIXEL + r"linear1", _FUSION, r"time_", r"audio_linear", r"visual_project")
_SHARED_RULES = [rule for rule in REFERENCE_RULES if not rule.pattern.startswith(_AV2TS_ONLY)]

# COMBO reference (after the backbone / VGGish prefixes) -> av2ts COMBO, see model/combo.py
COMBO_RULES = [
    PIXEL_INPUT_PROJ_RULE,
    *_SHARED_RULES,
    Rule(_FUSION + r"(audio_pos|level_embed)\.", r"fusion.\1."),
    Rule(_FUSION + r"b_attn\.layer_norm_v_list\.0\.", "fusion.norm_visual."),
    Rule(_FUSION + r"b_attn\.layer_norm_a_list\.0\.", "fusion.norm_audio."),
    Rule(_FUSION + r"b_attn\.attn_list\.0\.", "fusion.attn."),
    Rule(_FUSION + r"b_attn\.gamma_v_list\.0$", "fusion.gamma_visual"),
    Rule(_FUSION + r"b_attn\.gamma_a$", "fusion.gamma_audio"),
    Rule(r"sem_seg_head\.audio_transformation\.embeddings\.", "fusion.audio_mlp.layers."),
]

# the released VGGish (harritaylor/torchvggish layout) -> model/vggish.py: the same inner names
VGGISH_RULES = [
    Rule(r"pproc\.", None, "VGGish PCA post-processor, switched off in COMBO"),
    Rule(r"(features\.|embeddings\.)", r"\1"),
]

_PRESETS = {"r50": "combo-r50", "pvt": "combo-pvt"}
_CHECKPOINTER_ENTRIES = {
    "trainer": "detectron2 trainer state (optimizer, scheduler, hooks), not model weights",
    "iteration": "detectron2 training iteration counter, not model weights",
}


def read_combo_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(model state dict, {top-level entry: why it is not used}) of a detectron2 Checkpointer file.

    Read with ``torch.load(weights_only=True)``; the model is under ``"model"`` (a bare state dict is accepted
    too). Every model entry must be a tensor.
    """
    import torch  # local: torch takes seconds to import; the rename tables do not need it

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    obj = read_torch_weights(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a detectron2 checkpoint dict")
    others: dict[str, str] = {}
    if isinstance(obj.get("model"), Mapping):
        for key in obj:
            if key != "model":
                others[str(key)] = _CHECKPOINTER_ENTRIES.get(key, "not the model (only 'model' holds its weights)")
        obj = obj["model"]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise CheckpointError(path, f"entry {bad[0]!r} of the model is not a tensor" if bad else "holds no tensors")
    return dict(obj), others


def _combo_config(state: Mapping, path, preset, subset, siam):
    if any(k.startswith(("time_attn_blocks_", "visual_project.")) for k in state):
        raise CheckpointError(path, "an AV2TS reference checkpoint (temporal attention keys), not COMBO: "
                                    "use --kind reference")
    if "audio_backbone.features.0.weight" not in state or not any(
            k.startswith("sem_seg_head.audio_transformation.") for k in state):
        raise CheckpointError(path, "no VGGish (audio_backbone.features.*) or audio MLP "
                                    "(sem_seg_head.audio_transformation.*) keys: not a COMBO checkpoint")
    return config_from_keys(state, path, preset, subset, siam, _PRESETS, "a COMBO")


def convert_combo_kind(source: str, kind: str, *, preset: str | None = None, subset: str | None = None,
                       siam: bool | None = None, base: str | None = None):
    """``(model, cfg, KeyMapping, meta)`` for ``kind`` ``combo`` or ``vggish`` (``convert.CONVERTERS``' entry for
    these kinds).

    For ``combo`` the mapping's ``dropped`` also lists the checkpoint's non-model entries (``trainer``,
    ``iteration``) under their own names.
    """
    from av2ts_cli.model import build_model  # local: the network imports torch

    if kind not in COMBO_KINDS:
        raise UsageError(f"unknown COMBO --kind {kind!r}; choose from {', '.join(COMBO_KINDS)}")
    path = converter_input(source)
    base_doc = None
    if kind == "combo":
        if base is not None:
            raise UsageError("--base does not apply to --kind combo: the checkpoint gives every tensor")
        state, others = read_combo_checkpoint(path)
        arch, cfg = _combo_config(state, path, preset, subset, siam)
        model = build_model(cfg)
        backbone_rules = D2_RESNET_RULES if arch == "r50" else PVT_RULES
        groups = [("backbone.", "backbone.", backbone_rules), ("pre_sam_backbone.", "siam_backbone.", backbone_rules),
                  ("audio_backbone.", "audio_encoder.", VGGISH_RULES), ("", "", COMBO_RULES)]
        required = [""]
        trained_on = f"unknown: converted from the COMBO reference checkpoint {path.name}"
    else:
        state, others = read_state_dict_file(path), {}
        model, cfg, base_doc = conversion_target(None, path, preset or (None if base else "combo-r50"), subset, siam,
                                                base)
        if cfg.family != "combo":
            raise UsageError(f"{path}: VGGish is COMBO's audio encoder; {cfg.preset} is an {cfg.family} model "
                             "(choose a combo-* --preset or a COMBO --base)")
        groups = [("", "audio_encoder.", VGGISH_RULES)]
        required = ["audio_encoder."]
        trained_on = None
    mapping: KeyMapping = map_state_dict(state, groups, model.state_dict(), path)
    fill_model(model, mapping, required, path)
    mapping.dropped.update(others)
    return model.eval(), cfg, mapping, conversion_meta(kind, source, mapping, cfg.family, base_doc, trained_on)
