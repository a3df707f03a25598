"""AVSegFormer reference checkpoints -> av2ts's AVSegFormer (model/avsegformer.py): the rename table, as a pure
function.

The reference (vvvb-github/AVSegFormer at 7083cb6) saves ``model.module.state_dict()`` as a bare state dict
(``torch.load(..., weights_only=True)`` returns it): ``backbone.*`` (PVT-v2-b5 with the original PVT names, or its
two-branch ResNet-50 "B2_ResNet"), ``vggish.*``, ``audio_proj.*`` and ``head.*``. ``convert_avsegformer`` renames
them to av2ts's keys, tensor for tensor (no tensor is reshaped or split), and reports what it did not use:

- ``head.fpn.*`` and ``head.attn_fc.*``: built by the reference but never run (their caller is commented out);
- ``backbone.layer3_2.*`` and ``backbone.layer4_2.*``: the ResNet's second branch, never run;
- ``vggish.pproc.*``: VGGish's PCA post-processor, off in every reference config;
- anything else with no counterpart in av2ts.

Checkpoints made before commit b2f40e2 (2023-08-14) come from a network without the audio query generator (and with
an auxiliary attention-mask head); they are refused with a ``ValueError``, as are a backbone or a class count that
contradict the config.

This module imports only the standard library, torch, ``av2ts_cli.config`` and ``av2ts_cli.model`` (for the target
layout), so that the app's ``av2ts convert`` and the tests can both call it on a state dict in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import torch

from av2ts_cli.config import ModelConfig
from av2ts_cli.weights.rules import Rule, apply_rules, stage

_FPN = "built by the reference head (SimpleFPN) but never run: its only caller is commented out"
_ATTN_FC = "built by the reference head (the old auxiliary attention-mask predictor) but never run"
_BRANCH2 = "the reference ResNet-50's second branch (layer3_2/layer4_2), built and saved but never run"
_PCA = "VGGish's PCA post-processor, switched off in every AVSegFormer config"

RULES = [
    Rule(r"head\.fpn\.", None, _FPN),
    Rule(r"head\.attn_fc\.", None, _ATTN_FC),
    Rule(r"backbone\.layer[34]_2\.", None, _BRANCH2),
    Rule(r"vggish\.pproc\.", None, _PCA),
    # PVT-v2-b5: original names -> timm features_only names (stage i of the reference is stages_{i-1})
    Rule(r"backbone\.patch_embed1\.", "backbone.patch_embed."),
    Rule(r"backbone\.patch_embed([2-4])\.", stage(-1, "backbone.stages_{}.downsample.")),
    Rule(r"backbone\.block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.",
         stage(-1, "backbone.stages_{}.blocks.{}.mlp.dwconv.")),
    Rule(r"backbone\.block([1-4])\.(\d+)\.", stage(-1, "backbone.stages_{}.blocks.{}.")),
    Rule(r"backbone\.norm([1-4])\.", stage(-1, "backbone.stages_{}.norm.")),
    # ResNet-50: branch 1 is timm's layer3/layer4; the stem, layer1 and layer2 keep torchvision's (= timm's) names
    Rule(r"backbone\.layer([34])_1\.", r"backbone.layer\1."),
    Rule(r"backbone\.(conv1|bn1|layer1|layer2)\.", r"backbone.\1."),
    Rule(r"vggish\.(features|embeddings)\.", r"audio_encoder.\1."),
    Rule(r"audio_proj\.", "audio_proj."),
    Rule(r"head\.transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"head.encoder.\1.attn."),
    Rule(r"head\.transformer\.encoder\.layers\.(\d+)\.linear([12])\.", r"head.encoder.\1.fc\2."),
    Rule(r"head\.transformer\.encoder\.layers\.(\d+)\.(norm[12])\.", r"head.encoder.\1.\2."),
    Rule(r"head\.transformer\.decoder\.layers\.(\d+)\.linear([12])\.", r"head.decoder.\1.fc\2."),
    Rule(r"head\.transformer\.decoder\.layers\.(\d+)\.(self_attn|cross_attn|norm[123])\.", r"head.decoder.\1.\2."),
    Rule(r"head\.fusion_block\.", "head.mixer."),
    Rule(r"head\.mlp\.layers\.(\d+)\.", r"head.mlp.\1."),
    Rule(r"head\.(in_proj\.|level_embed$|query_generator\.|learnable_query\.|lateral_conv\.|out_conv\.|fc\.)",
         r"head.\1"),
]
_NO_RULE = "no counterpart in av2ts's AVSegFormer"

_BACKBONES = {"pvt_v2_b5": ("PVT-v2-b5", "backbone.patch_embed1.proj.weight"),
              "resnet50": ("ResNet-50", "backbone.conv1.weight")}


class Conversion(NamedTuple):
    """What ``convert_avsegformer`` returns; unpacks as ``state, unused, missing``."""

    state: dict[str, torch.Tensor]  # av2ts key -> the reference's tensor (the same object, not a copy)
    unused: dict[str, str]  # reference key -> why it has no place in av2ts's network
    missing: list[str]  # av2ts keys that no reference tensor filled (empty for a complete checkpoint)


def rename(key: str) -> tuple[str | None, str]:
    """(av2ts key, "") for a reference key, or (None, why it is not used)."""
    new, rule = apply_rules(key, RULES)
    if rule is None:
        return None, _NO_RULE
    return (None, rule.reason) if new is None else (new, "")


def target_layout(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The av2ts state-dict layout {key: shape} of ``cfg``, from a model built on the meta device (no memory, no
    init cost; drop path has no tensors, so it is left out of the meta build)."""
    from av2ts_cli.model import build_model  # local: the model package imports timm, which takes seconds

    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, drop_path_rate=0.0))
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def convert_avsegformer(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                        target: Mapping[str, torch.Size] | None = None) -> Conversion:
    """Map a reference AVSegFormer state dict onto the keys of av2ts's AVSegFormer for ``cfg``.

    state: the reference's bare state dict (a ``module.`` prefix on every key, from a DataParallel wrapper, is
    tolerated); cfg: an ``avsegformer`` config whose backbone and subset match the checkpoint's; target: the
    av2ts layout {key: shape} if already at hand (else it is built from ``cfg``).

    Returns ``Conversion(state, unused, missing)``; ``model.load_state_dict(conversion.state, strict=True)``
    succeeds when ``missing`` is empty. ValueError for a checkpoint of the code before the query generator existed,
    for non-tensor entries, and for a backbone or tensor shapes (e.g. the class count) that contradict ``cfg``.
    """
    if cfg.family != "avsegformer":
        raise ValueError(f"model config {cfg.preset!r} is of family {cfg.family!r}, not avsegformer")
    state = dict(state)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise ValueError(f"entry {bad[0]!r} of the state dict is not a tensor" if bad else "the state dict is empty")
    _refuse_old_layout(state)
    _check_backbone(state, cfg)
    layout = dict(target) if target is not None else target_layout(cfg)

    mapped: dict[str, torch.Tensor] = {}
    unused: dict[str, str] = {}
    wrong_shape = []
    for key, tensor in state.items():
        new, reason = rename(key)
        if new is None:
            unused[key] = reason
        elif new not in layout:
            unused[key] = f"renamed {new}, which {cfg.preset} does not have"
        elif tuple(layout[new]) != tuple(tensor.shape):
            wrong_shape.append(f"{key} {list(tensor.shape)} (av2ts {new} is {list(layout[new])})")
        else:
            mapped[new] = tensor
    if wrong_shape:
        more = "; ..." if len(wrong_shape) > 4 else ""
        raise ValueError(f"{len(wrong_shape)} tensor(s) do not fit {cfg.preset} for {cfg.subset} "
                         f"({output_hint(cfg)}): " + "; ".join(wrong_shape[:4]) + more)
    missing = [key for key in layout if key not in mapped]
    return Conversion(mapped, unused, missing)


def _refuse_old_layout(state: Mapping[str, torch.Tensor]) -> None:
    """A checkpoint with a head but no query generator is from the code before commit b2f40e2 (2023-08-14): queries
    were the repeated audio token and an auxiliary attention-mask head was trained (docs: spec section 7)."""
    if any(k.startswith("head.") for k in state) and not any(k.startswith("head.query_generator.") for k in state):
        raise ValueError(
            "the checkpoint has no head.query_generator.* keys (head.query_generator.query.weight and its "
            "layers): it was made by AVSegFormer's code before commit b2f40e2 (2023-08-14), whose network had no "
            "audio query generator. av2ts builds the later network; use the checkpoints linked by the README at "
            "7083cb6 (2023-08-14 17:33)")


def _check_backbone(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    found = [name for name, (_, probe) in _BACKBONES.items() if probe in state]
    if found and cfg.backbone in _BACKBONES and found[0] != cfg.backbone:
        raise ValueError(f"the checkpoint's backbone is {_BACKBONES[found[0]][0]} ({_BACKBONES[found[0]][1]}), "
                         f"but {cfg.preset} builds {_BACKBONES[cfg.backbone][0]}: choose the matching preset")


def output_hint(cfg: ModelConfig) -> str:
    from av2ts_cli.model.avsegformer import output_channels  # local: the model package imports timm

    return f"{output_channels(cfg)} output channel(s)"


# ------------------------------------------------------------------------------------------------- av2ts convert
_ARCH_PRESETS = {"pvt_v2_b5": "avsegformer-pvt", "resnet50": "avsegformer-r50"}
_OUTPUT_KEY = "head.fc.4.weight"  # [outputs, 32, 1, 1]: 1 for S4/MS3 (the sounding object), 71 for AVSS


def convert_avsegformer_kind(source: str, kind: str, *, preset: str | None = None, subset: str | None = None,
                             siam: bool | None = None, base: str | None = None):
    """``av2ts convert FILE --kind avsegformer``: a reference checkpoint (a bare state dict, read with
    ``torch.load(weights_only=True)``) -> ``(model, cfg, KeyMapping, meta)`` as every converter returns
    (``convert.CONVERTERS``). The backbone is read from the keys; S4 and MS3 checkpoints look alike (one output
    channel), so they need ``--subset`` (AVSS's 71 channels say it)."""
    # local: the shared machinery imports the checkpoint code; the rename table above needs only torch
    from av2ts_cli.config import PRESET_NAMES, get_preset
    from av2ts_cli.errors import CheckpointError, UsageError
    from av2ts_cli.model import build_model
    from av2ts_cli.weights.mapping import KeyMapping, conversion_meta, converter_input, read_torch_weights

    if base is not None:
        raise UsageError("--base does not apply to --kind avsegformer: the checkpoint gives every tensor")
    if siam:
        raise UsageError("--siam: AVSegFormer has no Siam encoder (it needs no maskiges)")
    presets = [name for name in PRESET_NAMES if get_preset(name).family == "avsegformer"]
    if preset is not None and preset not in presets:
        raise UsageError(f"--preset {preset}: not an AVSegFormer preset; choose from {', '.join(presets)}")
    path = converter_input(source)
    state = read_torch_weights(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(path, "holds no state dict (AVSegFormer saves a bare dict of tensors)")
    state = {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k: v for k, v in state.items()}
    found = [name for name, (_, probe) in _BACKBONES.items() if probe in state]
    if not found:
        raise CheckpointError(path, "no backbone.patch_embed1.proj.weight (PVT-v2-b5) nor backbone.conv1.weight "
                                    "(ResNet-50): not an AVSegFormer checkpoint")
    try:  # before asking for --subset: an old checkpoint cannot be converted whatever the subset
        _refuse_old_layout(state)
    except ValueError as err:
        raise CheckpointError(path, str(err)) from None
    preset = preset or _ARCH_PRESETS[found[0]]
    outputs = state.get(_OUTPUT_KEY)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 4:
        raise CheckpointError(path, f"no {_OUTPUT_KEY} tensor: not an AVSegFormer checkpoint")
    if subset is None:
        if outputs.shape[0] == 1:
            raise UsageError(f"{path}: an S4 or MS3 checkpoint (one output channel; the two look alike): pass "
                             "--subset s4 or --subset ms3")
        subset = "avss"
    try:
        cfg = get_preset(preset, subset)
        conversion = convert_avsegformer(state, cfg)
    except ValueError as err:
        raise CheckpointError(path, str(err)) from None
    if conversion.missing:
        raise CheckpointError(path, f"leaves {len(conversion.missing)} av2ts tensors unfilled "
                                    f"({', '.join(sorted(conversion.missing)[:3])}...)")
    model = build_model(cfg)
    with torch.no_grad():
        model.load_state_dict(conversion.state, strict=True)
    origin = {}
    for key in state:
        new = rename(key)[0]
        if new in conversion.state:
            origin[new] = key
    mapping = KeyMapping(tensors=conversion.state, origin=origin, dropped=conversion.unused)
    trained_on = f"unknown: converted from the AVSegFormer reference checkpoint {path.name}"
    return model.eval(), cfg, mapping, conversion_meta(kind, source, mapping, cfg.family, None, trained_on)
