"""Importing upstream weights files into av2ts checkpoints (``av2ts convert``).

No trained AV2TS weights are published (see ``weights.py`` and docs/model.md, "Checkpoints and the reference key
mapping"); the upstream files that *are*
useful are initialisations:

- ``--kind reference``: a checkpoint trained with the reference code (OrigamiSL/AV2TS on detectron2), a torch file
  ``{"model": state_dict}`` in the layout of docs/model.md (its reference key mapping) -> a full av2ts checkpoint;
- ``--kind detectron2``: the backbone pickles ``R-50.pkl`` / ``d2_pvt_v2_b5.pkl`` -> the visual backbone and the
  Siam encoder (both from the same file, as the reference does) of a new or given checkpoint;
- ``--kind ced`` / ``ced-hf``: CED-Mini from ``audiotransformer_mini_mAP_4896.pt`` (Zenodo) or from the
  transformers conversion ``hf://mispeech/ced-mini`` -> the audio encoder.

Foreign files are read only with ``torch.load(weights_only=True)``, safetensors, or (detectron2 pickles) an
unpickler that allows exactly the numpy globals needed to rebuild arrays and refuses anything else.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from av2ts_cli.checkpoints import (
    HF_PREFIX,
    REGISTRY,
    WEIGHTS_FILE,
    first_keys,
    hub_download,
    load_checkpoint,
    parse_hub_ref,
    part_of,
    read_safetensors,
    save_checkpoint,
)
from av2ts_cli.config import get_preset
from av2ts_cli.console import console
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.safe_pickle import read_numpy_pickle


# ------------------------------------------------------------------------------------------- reading foreign files
def read_torch_weights(path: str | os.PathLike):
    """A ``torch.save`` file through ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    import torch  # local: torch takes seconds to import; convert_combo's rename tables do not need it

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line),
                     str(err).splitlines()[0] if str(err) else "")
        raise CheckpointError(path, "refused by torch.load(weights_only=True), it holds more than tensors "
                                    f"({first}); re-save only the weights, e.g. "
                                    "torch.save({'model': checkpoint['model']}, 'weights.pth')") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(path, f"unreadable torch file: {type(err).__name__}: {err}") from None


def read_state_dict_file(path: str | os.PathLike) -> dict:
    """A flat ``{key: torch.Tensor}`` from a foreign weights file (.safetensors, torch .pt/.pth or numpy .pkl).

    Wrappers are unwrapped: ``{"model": ...}`` (detectron2, CED) and ``{"state_dict": ...}``. Numpy arrays become
    tensors sharing their memory; non-tensor entries of the state dict are refused.
    """
    import numpy as np  # local: with torch, only for reading files (convert_combo's tables need neither)
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.suffix == ".safetensors":
        obj = read_safetensors(path)
    elif path.suffix == ".pkl" and not zipfile.is_zipfile(path):
        obj = read_numpy_pickle(path)
    else:
        obj = read_torch_weights(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, "holds no state dict (expected a dict of tensors, possibly under 'model')")
    state = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, np.generic):
            value = torch.as_tensor(value)
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


# -------------------------------------------------------------------------------------------------- rename rules
@dataclass(frozen=True)
class Rule:
    """Source keys matching ``pattern`` (a regex anchored at the start) are renamed by replacing the matched prefix
    with ``target`` (a ``re`` template, or a function of the match); ``target=None`` drops them for ``reason``."""

    pattern: str
    target: str | Callable[[re.Match], str] | None
    reason: str = ""


def _stage(offset: int, template: str) -> Callable[[re.Match], str]:
    """A target that renumbers the first group: ``_stage(-1, "layer{}.")`` turns res2 into layer1."""
    return lambda m: template.format(int(m[1]) + offset, *m.groups()[1:])


def _apply_rules(key: str, rules: list[Rule]) -> tuple[str | None, Rule | None]:
    for rule in rules:
        match = re.match(rule.pattern, key)
        if match:
            if rule.target is None:
                return None, rule
            new = rule.target(match) if callable(rule.target) else match.expand(rule.target)
            return new + key[match.end():], rule
    return key, None


_FC_DROPPED = "ImageNet classifier, not part of a feature extractor"

# detectron2 ResNet (torchvision converted with detectron2's convert-torchvision-to-d2.py) -> timm resnet
D2_RESNET_RULES = [
    Rule(r"(stem\.)?fc\.", None, _FC_DROPPED),
    Rule(r"stem\.conv1\.norm\.", "bn1."),
    Rule(r"stem\.conv1\.", "conv1."),
    Rule(r"res([2-5])\.(\d+)\.conv([1-3])\.norm\.", _stage(-1, "layer{}.{}.bn{}.")),
    Rule(r"res([2-5])\.(\d+)\.conv([1-3])\.", _stage(-1, "layer{}.{}.conv{}.")),
    Rule(r"res([2-5])\.(\d+)\.shortcut\.norm\.", _stage(-1, "layer{}.{}.downsample.1.")),
    Rule(r"res([2-5])\.(\d+)\.shortcut\.", _stage(-1, "layer{}.{}.downsample.0.")),
]

# original PVT-v2 names (d2_pvt_v2_b5.pkl and the reference backbone) -> timm pvt_v2 (timm's own remap, restated)
PVT_RULES = [
    Rule(r"head\.", None, _FC_DROPPED),
    Rule(r"patch_embed1\.", "patch_embed."),
    Rule(r"patch_embed([2-4])\.", _stage(-1, "stages.{}.downsample.")),
    Rule(r"block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.", _stage(-1, "stages.{}.blocks.{}.mlp.dwconv.")),
    Rule(r"block([1-4])\.(\d+)\.", _stage(-1, "stages.{}.blocks.{}.")),
    Rule(r"norm([1-4])\.", _stage(-1, "stages.{}.norm.")),
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
_PRED = r"sem_seg_head\.predictor\."
REFERENCE_RULES = [
    Rule(r"criterion\.", None, "a constant of the loss (no-object weight), rebuilt from the config"),
    Rule(_PIXEL + r"input_proj\.", None, "built by the reference pixel decoder but never used in its forward"),
    Rule(_PIXEL + r"linear1\.", None, "built by the reference pixel decoder but never used in its forward"),
    Rule(r"scale_factor_module\.(\d+)\.", r"siam_gates.gates.\1."),
    Rule(r"time_attn_blocks_([1-3])\.", _stage(-1, "acoustic_attention.blocks.{}.")),
    Rule(r"time_norm\.", "acoustic_attention.norm."),
    Rule(r"audio_linear([1-4])\.", _stage(-1, "acoustic_attention.projections.{}.")),
    Rule(r"visual_project\.(\d+)\.", r"visual_attention.projections.\1."),
    Rule(r"time_visual_attn_blocks\.(\d+)\.", r"visual_attention.blocks.\1."),
    Rule(r"time_visual_norm\.(\d+)\.", r"visual_attention.norms.\1."),
    Rule(_PIXEL + r"transformer\.level_embed", "pixel_decoder.level_embed"),
    Rule(_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"pixel_decoder.layers.\1.attn."),
    Rule(_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.linear([12])\.", r"pixel_decoder.layers.\1.fc\2."),
    Rule(_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.(norm[12])\.", r"pixel_decoder.layers.\1.\2."),
    Rule(_PIXEL + r"mask_features\.", "pixel_decoder.mask_projection."),
    Rule(_PIXEL + r"adapter_1\.norm\.", "pixel_decoder.lateral.norm."),
    Rule(_PIXEL + r"adapter_1\.", "pixel_decoder.lateral.conv."),
    Rule(_PIXEL + r"layer_1\.norm\.", "pixel_decoder.output.norm."),
    Rule(_PIXEL + r"layer_1\.", "pixel_decoder.output.conv."),
    Rule(_FUSION + r"(audio_pos|level_embed)\.", r"fusion.\1."),
    Rule(_FUSION + r"conv_proj_1\.", "fusion.reduce."),
    Rule(_FUSION + r"b_attn\.layer_norm_v_list\.0\.", "fusion.norm_visual."),
    Rule(_FUSION + r"b_attn\.layer_norm_a_list\.0\.", "fusion.norm_audio."),
    Rule(_FUSION + r"b_attn\.attn_list\.0\.attn_block\.(\d+)\.", r"fusion.blocks.\1."),
    Rule(_FUSION + r"b_attn\.attn_list\.0\.norm\.", "fusion.norm."),
    Rule(_FUSION + r"b_attn\.gamma_v_list\.0$", "fusion.gamma_visual"),
    Rule(_FUSION + r"b_attn\.gamma_a$", "fusion.gamma_audio"),
    Rule(_PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.self_attn."),
    Rule(_PRED + r"transformer_self_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.self_norm."),
    Rule(_PRED + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.cross_attn."),
    Rule(_PRED + r"transformer_cross_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.cross_norm."),
    Rule(_PRED + r"transformer_ffn_layers\.(\d+)\.linear([12])\.", r"decoder.layers.\1.fc\2."),
    Rule(_PRED + r"transformer_ffn_layers\.(\d+)\.norm\.", r"decoder.layers.\1.ffn_norm."),
    Rule(_PRED + r"decoder_norm\.", "decoder.norm."),
    Rule(_PRED + r"(query_feat|query_embed|level_embed|class_embed|mask_embed)\.", r"decoder.\1."),
]

# where each group of source keys goes: (source prefix, av2ts prefix, inner rules)
_REFERENCE_PREFIXES = {
    "r50": [("backbone.", "backbone.", D2_RESNET_RULES), ("pre_sam_backbone.", "siam_backbone.", D2_RESNET_RULES),
            ("audio_backbone.", "audio_encoder.", CED_RULES)],
    "pvt": [("backbone.", "backbone.", PVT_RULES), ("pre_sam_backbone.", "siam_backbone.", PVT_RULES),
            ("audio_backbone.", "audio_encoder.", CED_RULES)],
}

_COUNTER_DROPPED = "batch-norm update counter; av2ts keeps these statistics frozen (no counter)"


# ----------------------------------------------------------------------------------------------------- converters
CONVERT_KINDS = ("reference", "detectron2", "ced", "ced-hf", "combo", "vggish")


@dataclass
class KeyMapping:
    """The result of renaming a foreign state dict onto an av2ts model."""

    tensors: dict = field(default_factory=dict)  # av2ts key -> tensor (the source tensor itself, not a copy)
    origin: dict[str, str] = field(default_factory=dict)  # av2ts key -> source key
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it is not used


def _timm_name_index(keys: Iterable[str]) -> dict[str, str]:
    """Canonical timm names (``stages.1.blocks...``) -> the names of a ``features_only`` model (``stages_1...``)."""
    return {re.sub(r"(^|\.)([A-Za-z]+)_(\d+)\.", r"\1\2.\3.", k): k for k in keys}


def map_state_dict(state: Mapping, groups: list[tuple[str, str, list[Rule]]], target: Mapping,
                   path: str | os.PathLike) -> KeyMapping:
    """Rename ``state`` onto the keys of ``target`` (an av2ts ``state_dict()``).

    ``groups`` are ``(source prefix, av2ts prefix, rules)``. A source key goes to the groups with the longest
    source prefix it starts with; several groups with the same source prefix each receive it (a detectron2
    backbone pickle fills both the backbone and the Siam encoder). A key that no rule knows, a name the model does
    not have, two sources for one tensor or a shape mismatch is one CheckpointError naming ``path`` and the first
    keys at fault.
    """
    index = _timm_name_index(target)
    result = KeyMapping()
    unknown, absent, wrong, twice = [], [], [], []
    for key, tensor in state.items():
        matching = [g for g in groups if key.startswith(g[0])]
        longest = max((len(g[0]) for g in matching), default=-1)
        matching = [g for g in matching if len(g[0]) == longest]
        if not matching:
            unknown.append(key)
        for src_prefix, dst_prefix, rules in matching:
            inner, rule = _apply_rules(key[len(src_prefix):], rules)
            if rule is None:
                unknown.append(key)
                break
            if inner is None:
                result.dropped[key] = rule.reason
                break
            dst = index.get(dst_prefix + inner, dst_prefix + inner)
            if dst not in target:
                if dst.endswith("num_batches_tracked"):
                    result.dropped[key] = _COUNTER_DROPPED
                else:
                    absent.append(f"{key} -> {dst}")
                continue
            if dst in result.tensors:
                twice.append(dst)
            elif tuple(tensor.shape) != tuple(target[dst].shape):
                wrong.append(f"{key} {list(tensor.shape)} -> {dst} {list(target[dst].shape)}")
            result.tensors[dst] = tensor
            result.origin[dst] = key
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys of no known layout ({first_keys(unknown)})")
    if absent:
        problems.append(f"{len(absent)} keys with no place in the av2ts model ({first_keys(absent)})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({first_keys(wrong)})")
    if twice:
        problems.append(f"{len(twice)} av2ts tensors given twice ({first_keys(twice)})")
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    return result


def fill_model(model, mapping: KeyMapping, required_prefixes: Iterable[str], path: str | os.PathLike) -> None:
    """Copy the mapped tensors into ``model``; every tensor under ``required_prefixes`` must have been given."""
    import torch  # local: torch takes seconds to import; convert_combo's rename tables do not need it

    target = model.state_dict()
    required = [k for k in target if any(k.startswith(p) for p in required_prefixes)]
    missing = [k for k in required if k not in mapping.tensors]
    if missing:
        raise CheckpointError(path, f"leaves {len(missing)} av2ts tensors unfilled ({first_keys(missing)})")
    with torch.no_grad():
        incompatible = model.load_state_dict(mapping.tensors, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys


def converter_input(source: str) -> Path:
    """A local converter input: the file itself, or the weights of an hf:// repository (or of a registry name that
    points at one, e.g. ``ced-mini``): its model.safetensors, else a pytorch_model.bin."""
    if not Path(source).expanduser().exists() and source in REGISTRY and REGISTRY[source].convert_kind:
        source = REGISTRY[source].source
    if source.startswith(HF_PREFIX):
        ref = parse_hub_ref(source)
        try:
            return hub_download(ref, WEIGHTS_FILE)
        except CheckpointError as err:
            if "not found in the repository" not in err.reason:
                raise
            return hub_download(ref, "pytorch_model.bin")  # repositories saved before safetensors was the default
    return Path(source).expanduser()


def _backbone_of(state: Mapping, prefix: str, path) -> str:
    if f"{prefix}stem.conv1.weight" in state:
        return "r50"
    if f"{prefix}patch_embed1.proj.weight" in state:
        return "pvt"
    if f"{prefix}conv1_w" in state:
        raise CheckpointError(path, "the MSRA Caffe2 ResNet-50 (BGR input, stride in the 1x1 conv); AV2TS uses the "
                                    "torchvision ResNet-50 converted by detectron2 (stem.conv1.weight, res2.0...)")
    raise CheckpointError(path, f"cannot tell the backbone: no {prefix}stem.conv1.weight (ResNet-50) nor "
                                f"{prefix}patch_embed1.proj.weight (PVT-v2) key")


_ARCH_PRESET = {"r50": "av2ts-r50", "pvt": "av2ts-pvt"}
_ARCH_TIMM = {"r50": "resnet50", "pvt": "pvt_v2_b5"}


def conversion_target(arch: str | None, path, preset, subset, siam, base):
    """(model, cfg, base config doc or None) to convert into: the ``base`` checkpoint, or a fresh preset model
    (``preset``, ``subset``, ``siam``; None: the defaults of ``arch``, a backbone file's architecture, or
    av2ts-r50). ``path``: the converter's input, named in errors. Shared with ``convert_combo``."""
    from av2ts_cli.model import build_model  # local: the network imports torch and timm

    if base is not None:
        if preset or subset or siam is not None:
            raise UsageError("--base gives the architecture: do not combine it with --preset/--subset/--siam")
        model, cfg, doc = load_checkpoint(base)
        if arch and cfg.backbone != _ARCH_TIMM[arch]:
            raise UsageError(f"{path}: a {_ARCH_TIMM[arch]} file does not fit --base {base} "
                             f"(backbone {cfg.backbone})")
        return model, cfg, doc
    preset = preset or _ARCH_PRESET.get(arch, "av2ts-r50")
    if arch and preset != _ARCH_PRESET[arch]:
        raise UsageError(f"{path}: a {_ARCH_TIMM[arch]} file does not fit --preset {preset}")
    cfg = get_preset(preset, subset or "s4", siam)
    return build_model(cfg), cfg, None


def config_from_keys(state: Mapping, path, preset, subset, siam, presets: Mapping[str, str], network: str):
    """``(arch, cfg)`` of a checkpoint written by a reference code base, read from its keys (backbone, Siam encoder,
    class count) and checked against the options given; ``presets`` maps "r50"/"pvt" to the family's preset,
    ``network`` names the code base in messages ("an AV2TS reference", "a COMBO")."""
    arch = _backbone_of(state, "backbone.", path)
    if preset and preset != presets[arch]:
        raise UsageError(f"{path}: holds a {presets[arch]} model, not {preset}")
    has_siam = any(k.startswith("pre_sam_backbone.") for k in state)
    if siam is not None and siam != has_siam:
        raise UsageError(f"{path}: the checkpoint {'has' if has_siam else 'has no'} Siam encoder "
                         f"(pre_sam_backbone); --{'no-' if siam is False else ''}siam contradicts it")
    class_key = "sem_seg_head.predictor.class_embed.weight"
    if class_key not in state:
        raise CheckpointError(path, f"no {class_key}: not {network} checkpoint")
    num_classes = state[class_key].shape[0] - 1  # the last class is "no object"
    if subset is None:
        subset = {2: "s4", 71: "avss"}.get(num_classes)
        if subset is None:
            raise CheckpointError(path, f"{num_classes} classes: no AVSBench subset has that many")
    cfg = get_preset(presets[arch], subset, has_siam)
    if cfg.num_classes != num_classes:
        raise UsageError(f"{path}: holds {num_classes} classes, but subset {subset} has {cfg.num_classes}")
    return arch, cfg


def convert(source: str, kind: str, *, preset: str | None = None, subset: str | None = None,
            siam: bool | None = None, base: str | None = None):
    """Import an upstream weights file: ``(model, cfg, KeyMapping, meta)`` ready for ``save_checkpoint``.

    ``kind``: ``reference`` (a full AV2TS checkpoint of the reference code: everything is filled, the preset,
    classes and Siam encoder are read from its keys), ``detectron2`` (backbone pickle: the visual backbone and the
    Siam encoder), ``ced`` / ``ced-hf`` (CED-Mini: the audio encoder). Partial kinds fill a fresh model of
    ``preset`` (inferred from the file where possible) or the checkpoint ``base``; the rest keeps its values.
    """
    from av2ts_cli.model import build_model  # local: the network imports torch and timm

    if kind not in CONVERT_KINDS:
        raise UsageError(f"unknown --kind {kind!r}; choose from {', '.join(CONVERT_KINDS)}")
    if kind in ("combo", "vggish"):  # convert_combo.py builds on this module, so this one cannot call it
        raise UsageError(f"--kind {kind} is imported by convert_combo.convert_combo_kind (the CLI calls it)")
    path = converter_input(source)
    state = read_state_dict_file(path)
    base_doc = None
    if kind == "reference":
        if base is not None:
            raise UsageError("--base does not apply to --kind reference: the checkpoint gives every tensor")
        arch, cfg = config_from_keys(state, path, preset, subset, siam, _ARCH_PRESET, "an AV2TS reference")
        model = build_model(cfg)
        groups = [(src, dst, rules) for src, dst, rules in _REFERENCE_PREFIXES[arch]] + [("", "", REFERENCE_RULES)]
        required = [""]
        trained_on = f"unknown: converted from the reference-implementation checkpoint {path.name}"
    elif kind == "detectron2":
        arch = _backbone_of(state, "", path)
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


def conversion_meta(kind: str, source: str, mapping: KeyMapping, family: str, base_doc: Mapping | None,
                    trained_on) -> dict:
    """The checkpoint meta of an import: the base checkpoint's (if any), with this import appended to
    ``initialised_from`` (kind, source, the parts it filled), and where the weights were trained."""
    meta = dict((base_doc or {}).get("meta") or {})
    history = list(meta.get("initialised_from") or [])
    history.append({"kind": kind, "source": source, "parts": sorted({part_of(k, family) for k in mapping.tensors})})
    meta["initialised_from"] = history
    if base_doc is not None:
        meta["trained_on"] = base_doc.get("trained_on")
        meta["classes"] = base_doc.get("classes")
    else:
        meta["trained_on"] = trained_on
    return meta


def convert_to_checkpoint(source: str, kind: str, out: str | os.PathLike, *, converter=None, **options) -> dict:
    """``convert`` (or ``converter``, a function with its signature and result, e.g.
    ``convert_combo.convert_combo_kind``) then ``save_checkpoint`` into ``out``; returns a JSON-ready summary."""
    out = Path(out)
    if options.get("base") and Path(options["base"]).expanduser().resolve() == out.expanduser().resolve():
        raise UsageError("--out must differ from --base: inputs are never overwritten")
    source_path = Path(source).expanduser()
    if source_path.exists() and source_path.resolve() == out.expanduser().resolve():
        raise UsageError("--out must differ from the source file")
    model, cfg, mapping, meta = (converter or convert)(source, kind, **options)
    save_checkpoint(model, cfg, out, meta)
    parts: dict[str, int] = {}
    for key in mapping.tensors:
        parts[part_of(key, cfg.family)] = parts.get(part_of(key, cfg.family), 0) + 1
    reasons: dict[str, int] = {}
    for reason in mapping.dropped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"out": str(out), "kind": kind, "source": source, "preset": cfg.preset, "subset": cfg.subset,
            "num_classes": cfg.num_classes, "siam": cfg.siam, "filled_tensors": len(mapping.tensors),
            "source_tensors_used": len(set(mapping.origin.values())), "filled_per_part": parts,
            "dropped": reasons}


def print_conversion_report(report: dict) -> None:
    table = Table(title=f"{report['preset']}, {report['subset']}, {report['num_classes']} classes, Siam encoder "
                        f"{'on' if report['siam'] else 'off'}")
    table.add_column(f"part filled from {report['kind']}")
    table.add_column("tensors", justify="right")
    for part, count in report["filled_per_part"].items():
        table.add_row(part, str(count))
    console.print(table)
    for reason, count in report["dropped"].items():
        console.print(f"dropped {count} source tensors: {reason}")
    console.print(f"Checkpoint saved to {report['out']}")
