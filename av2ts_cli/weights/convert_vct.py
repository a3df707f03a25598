"""VCT reference checkpoints -> av2ts's VCT (model/vct.py): a pure key mapping (``convert_vct_state``, no file
access) and, at the end, the file import behind ``av2ts convert FILE --kind vct`` (``convert_vct_kind``).

The reference (spyflying/VCT_AVS) publishes detectron2 Checkpointer files, ``{"model": state_dict, "trainer": ...,
"iteration": ...}``; ``convert_vct_state`` maps the ``"model"`` state dict onto the state dict of ``build_model(cfg)``
for a ``vct-*`` config (``vct_config_for`` reads the subset and the Siam encoder from the keys). Every tensor is
kept as it is (same values, shape and dtype); only names change, except for what av2ts does not build:

- ``audio_backbone.embeddings.*``: VGGish's linear layers, built and loaded by the reference but never run (VCT
  reads VGGish's conv map);
- ``*.attn.relative_position_index``: the Swin windows' index tables, rebuilt by timm (same values, not saved);
- ``criterion.empty_weight``: a constant of the loss (the no-object weight), rebuilt from the config.

The Swin backbones (``backbone.``, ``pre_sam_backbone.``) keep their inner names except that the reference merges
patches at the end of a stage and timm at the start of the next (``layers.{i}.downsample`` ->
``layers.{i+1}.downsample``) and that the per-stage LayerNorms ``norm0..2`` become ``stage_norms.{0..2}`` and
``norm3`` timm's final ``norm`` (``model/backbone.py`` ``SwinFeatures``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from av2ts_cli.config import S4_CATEGORIES, SUBSET_CLASSES, ModelConfig, get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.weights.rules import DECODER_RULES, PIXEL_DECODER_RULES, PIXEL_INPUT_PROJ_RULE, Rule, apply_rules

_UNUSED_VGGISH_FC = "VGGish's linear layers: loaded by the reference but never run (VCT reads the conv map)"
_UNUSED_INDEX = "Swin relative-position index: a constant table that timm rebuilds (not saved by av2ts)"
_UNUSED_CRITERION = "a constant of the loss (no-object weight), rebuilt from the config"

_PRED = r"sem_seg_head\.predictor\."
_VQB = _PRED + r"visual_query_block\."
_SWIN_PREFIXES = {"backbone.": "backbone.", "pre_sam_backbone.": "siam_backbone."}


def _next_stage(m: re.Match) -> str:
    return f"layers.{int(m.group(1)) + 1}.downsample."


# inside a Swin backbone, after its prefix
SWIN_RULES = [
    Rule(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$", None, _UNUSED_INDEX),
    Rule(r"layers\.(\d+)\.downsample\.", _next_stage),
    Rule(r"norm([0-2])\.", r"stage_norms.\1."),
    Rule(r"norm3\.", "norm."),
    Rule(r"(patch_embed\.|layers\.\d+\.blocks\.)", r"\1"),
]

# everything but the backbones
VCT_RULES = [
    Rule(r"criterion\.empty_weight$", None, _UNUSED_CRITERION),
    Rule(r"criterion\.logit_scale$", "alignment.logit_scale"),
    Rule(r"scale_factor_module\.(\d+)\.", r"siam_gates.gates.\1."),
    Rule(r"audio_backbone\.features\.", "audio_encoder.features."),
    Rule(r"audio_backbone\.embeddings\.", None, _UNUSED_VGGISH_FC),
    Rule(r"sem_seg_head\.audio_transformation\.embeddings\.", "audio_mlp.layers."),
    # the pixel decoder and the decoder, as COMBO's
    PIXEL_INPUT_PROJ_RULE,
    *PIXEL_DECODER_RULES,
    *DECODER_RULES,
    # the query generator (ProtoVCQ / VCQ)
    Rule(_VQB + r"prototype\.", "queries.prototypes."),
    Rule(_VQB + r"(pre_proj|query_mixer)\.", r"queries.\1."),
    Rule(_VQB + r"pre_attn\.multihead_attn\.", "queries.prototype_attn."),
    Rule(_VQB + r"pre_attn\.norm\.", "queries.prototype_norm."),
    Rule(_VQB + r"assign_attn\.(q_proj|k_proj|v_proj|proj)\.", r"queries.assign.\1."),
    Rule(_PRED + r"(audio_proj|proto_proj)\.", r"alignment.\1."),
]


@dataclass
class VctConversion:
    """``state``: av2ts key -> tensor (the reference's tensor object); ``unused``: reference key -> why it is not
    used (never run, rebuilt, no place in this config, or of no known layout); ``missing``: av2ts keys that no
    reference key filled (empty for a complete checkpoint)."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def map_vct_key(key: str) -> tuple[str | None, str]:
    """(av2ts key, "") for a reference key, or (None, why it is not used)."""
    for prefix, ours in _SWIN_PREFIXES.items():
        if key.startswith(prefix):
            return _apply(SWIN_RULES, key[len(prefix):], ours)
    return _apply(VCT_RULES, key, "")


def _apply(rules: list[Rule], key: str, prefix: str) -> tuple[str | None, str]:
    new, rule = apply_rules(key, rules)
    if rule is None:
        return None, "no known VCT layout"
    return (None, rule.reason) if new is None else (prefix + new, "")


def vct_config_for(state: Mapping[str, torch.Tensor], preset: str = "vct-swinb") -> ModelConfig:
    """The ``preset`` config for a reference state dict: the subset from the class head (3 logits: S4 or MS3, 72:
    AVSS) and the prototypes (23: S4, none: MS3), the Siam encoder from ``pre_sam_backbone.*``. UsageError when
    the keys fit no VCT subset."""
    classes = state.get("sem_seg_head.predictor.class_embed.bias")
    prototypes = state.get("sem_seg_head.predictor.visual_query_block.prototype.weight")
    if classes is None:
        raise UsageError("no sem_seg_head.predictor.class_embed.bias: not a VCT reference state dict")
    num_prototypes = 0 if prototypes is None else prototypes.shape[0]
    subsets = [s for s, k in SUBSET_CLASSES.items() if k + 1 == classes.shape[0]
               and num_prototypes == {"s4": S4_CATEGORIES, "ms3": 0}.get(s, k)]
    if len(subsets) != 1:
        raise UsageError(f"a class head of {classes.shape[0]} logits with {num_prototypes} prototypes fits no VCT "
                         "subset (S4: 3 and 23, MS3: 3 and none, AVSS: 72 and 71)")
    siam = any(k.startswith("pre_sam_backbone.") for k in state)
    return get_preset(preset, subsets[0], siam)


def convert_vct_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> VctConversion:
    """Map a VCT reference state dict (the ``"model"`` entry of a detectron2 Checkpointer file; the whole file's
    dict is accepted too) onto av2ts's VCT for ``cfg``.

    A reference key whose av2ts key the model for ``cfg`` does not have (for example the prototypes of an S4
    checkpoint given an MS3 config) is reported unused; a tensor whose shape differs from the model's is a
    UsageError naming both (the config does not fit the checkpoint). The target layout is read from a model built
    on the meta device (no memory, no weights).
    """
    from av2ts_cli.model import build_model  # local: the network imports timm; the rules above do not need it

    if cfg.family != "vct":
        raise UsageError(f"{cfg.preset} is an {cfg.family} model config, not a VCT one")
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    result = VctConversion()
    mismatched = []
    for key, tensor in state.items():
        ours, why = map_vct_key(key)
        if ours is None:
            result.unused[key] = why
        elif ours not in shapes:
            result.unused[key] = f"no place in {cfg.preset} ({cfg.subset}, siam={cfg.siam}): {ours}"
        elif tuple(tensor.shape) != shapes[ours]:
            mismatched.append(f"{key} {list(tensor.shape)} -> {ours} {list(shapes[ours])}")
        elif ours in result.state:
            raise UsageError(f"two reference keys map to {ours} (the second: {key})")
        else:
            result.state[ours] = tensor
    if mismatched:
        raise UsageError(f"{len(mismatched)} tensors do not fit {cfg.preset} ({cfg.subset}): "
                         + "; ".join(mismatched[:5]))
    result.missing = [k for k in shapes if k not in result.state]
    return result


# ------------------------------------------------------------------------------------------------- av2ts convert
VCT_PRESETS = ("vct-swinb", "vct-tiny")


def convert_vct_kind(source: str, kind: str, *, preset: str | None = None, subset: str | None = None,
                     siam: bool | None = None, base: str | None = None):
    """``av2ts convert FILE --kind vct``: a detectron2 Checkpointer file of the VCT code (``{"model": ...}`` with
    the trainer's state, read with ``torch.load(weights_only=True)``; keys by name, so detectron2's version hooks do
    not matter) -> ``(model, cfg, KeyMapping, meta)`` as every converter returns (``convert.CONVERTERS``).

    The subset and the Siam encoder are read from the keys and checked against ``--subset`` / ``--siam``; the
    architecture is ``--preset`` (vct-swinb, the published one, by default). Every tensor of the model must be
    filled (a CheckpointError lists the first missing); every file entry not used is in the mapping's ``dropped``
    with its reason (VGGish's linear layers, the Swin index tables, the loss constant, the trainer's entries,
    keys of no known layout)."""
    # local: the shared readers import the checkpoint code and the network imports timm; the rules above need neither
    from av2ts_cli.errors import CheckpointError
    from av2ts_cli.model import build_model
    from av2ts_cli.weights.convert_combo import read_combo_checkpoint
    from av2ts_cli.weights.mapping import KeyMapping, conversion_meta, converter_input

    if base is not None:
        raise UsageError("--base does not apply to --kind vct: the checkpoint gives every tensor")
    preset = preset or VCT_PRESETS[0]
    if preset not in VCT_PRESETS:
        raise UsageError(f"--preset {preset} is not a VCT architecture; --kind vct converts into "
                         f"{' or '.join(VCT_PRESETS)}")
    if subset is not None and subset not in SUBSET_CLASSES:
        raise UsageError(f"unknown --subset {subset!r}; choose from {', '.join(SUBSET_CLASSES)}")
    path = converter_input(source)
    state, others = read_combo_checkpoint(path)  # the same detectron2 Checkpointer file as COMBO's
    try:
        cfg = vct_config_for(state, preset)
    except UsageError as err:
        raise CheckpointError(path, err.message) from None
    if subset is not None and subset != cfg.subset:
        raise UsageError(f"{path}: holds a VCT {cfg.subset} model (its class head and prototypes); --subset is "
                         f"{subset}")
    if siam is not None and siam != cfg.siam:
        raise UsageError(f"{path}: the checkpoint {'has' if cfg.siam else 'has no'} Siam encoder "
                         f"(pre_sam_backbone); --{'siam' if siam else 'no-siam'} contradicts it")
    try:
        conversion = convert_vct_state(state, cfg)
    except UsageError as err:  # tensors of another size: the file is not of this preset
        raise UsageError(f"{path}: {err.message}") from None
    if conversion.missing:
        raise CheckpointError(path, f"leaves {len(conversion.missing)} av2ts tensors of {cfg.preset} unfilled "
                                    f"({', '.join(sorted(conversion.missing)[:3])}"
                                    f"{' ...' if len(conversion.missing) > 3 else ''})")
    model = build_model(cfg)
    with torch.no_grad():
        model.load_state_dict(conversion.state, strict=True)
    origin = {ours: theirs for theirs in state if (ours := map_vct_key(theirs)[0]) in conversion.state}
    mapping = KeyMapping(tensors=conversion.state, origin=origin, dropped={**conversion.unused, **others})
    trained_on = f"unknown: converted from the VCT reference checkpoint {path.name}"
    return model.eval(), cfg, mapping, conversion_meta(kind, source, mapping, cfg.family, None, trained_on)
