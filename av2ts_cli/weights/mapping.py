"""The machinery every converter shares: safe readers of foreign weights files, ``map_state_dict`` (rename a
foreign state dict onto an av2ts model by ``rules.Rule``s, every key accounted for), ``fill_model``, the conversion
target (a fresh preset model or a ``--base`` checkpoint) and the meta an import records.

Foreign files are read only with ``torch.load(weights_only=True)``, safetensors, or (detectron2 pickles) an
unpickler that allows exactly the numpy globals needed to rebuild arrays and refuses anything else.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from av2ts_cli.config import get_preset
from av2ts_cli.errors import CheckpointError, UsageError, describe_os_error
from av2ts_cli.safe_pickle import read_numpy_pickle
from av2ts_cli.weights.checkpoint import (
    WEIGHTS_FILE,
    find_checkpoint,
    first_keys,
    load_checkpoint_files,
    part_of,
    read_safetensors,
)
from av2ts_cli.weights.hub import HF_PREFIX, hub_download, parse_hub_ref
from av2ts_cli.weights.registry import REGISTRY
from av2ts_cli.weights.rules import Rule, apply_rules


# ------------------------------------------------------------------------------------------- reading foreign files
def read_torch_weights(path: str | os.PathLike):
    """A ``torch.save`` file through ``torch.load(weights_only=True)`` (tensors and plain containers only).

    A file that is not one is one CheckpointError naming it and saying what it is instead (``damage``): empty,
    truncated, a web page, or not torch's format at all; never the reader's own EOF or zip words."""
    import torch  # local: torch takes seconds to import; convert_combo's rename tables do not need it

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        broken = damage(path)
        if broken:
            raise CheckpointError(path, broken) from None
        first = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line),
                     str(err).splitlines()[0] if str(err) else "")
        raise CheckpointError(path, "refused by torch.load(weights_only=True), it holds more than tensors "
                                    f"({first}); re-save only the weights, e.g. "
                                    "torch.save({'model': checkpoint['model']}, 'weights.pth')") from None
    except OSError as err:
        raise CheckpointError(path, f"unreadable: {describe_os_error(OSError(err.errno, err.strerror))}") from None
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        broken = damage(path) or "damaged: torch.load cannot read it (" + " ".join(str(err).split())[:120] + ")"
        raise CheckpointError(path, broken) from None


_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's old format: its magic number
_AGAIN = "an interrupted download or copy? fetch or copy it again"


def damage(path: Path) -> str | None:
    """What is wrong with a file that should be a ``torch.save`` file, in words, or None when it looks whole: empty;
    a zip archive (torch.save's format) without its end; a web page (a download that got a sign-in, quota or
    virus-scan page); neither of torch's two formats."""
    size = path.stat().st_size
    if size == 0:
        return f"empty file (0 bytes), not a checkpoint: {_AGAIN}"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return f"truncated: the zip archive torch.save writes ends early, its directory missing ({size:,} " \
                   f"bytes): {_AGAIN}"
        return None
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "a web page, not a checkpoint: the download got an HTML page (a sign-in, quota or virus-scan " \
               "page) instead of the file"
    if head.startswith(_TORCH_LEGACY_MAGIC[:size]) and size <= len(_TORCH_LEGACY_MAGIC):
        return f"truncated after {size} bytes: {_AGAIN}"
    if not head.startswith(_TORCH_LEGACY_MAGIC):
        return f"not a torch.save file (neither its zip archive nor its older format; {size:,} bytes)"
    return None


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


_COUNTER_DROPPED = "batch-norm update counter; av2ts keeps these statistics frozen (no counter)"



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
            inner, rule = apply_rules(key[len(src_prefix):], rules)
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
    points at one, e.g. ``ced-mini``): its model.safetensors, else a pytorch_model.bin. (A registry name whose
    file is on Google Drive is a name, not a converter input: ``--model NAME`` fetches and converts it.)"""
    entry = REGISTRY.get(source)
    if not Path(source).expanduser().exists() and entry and entry.convert_kind and entry.source.startswith(HF_PREFIX):
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


def backbone_of(state: Mapping, prefix: str, path) -> str:
    if f"{prefix}stem.conv1.weight" in state:
        return "r50"
    if f"{prefix}patch_embed1.proj.weight" in state:
        return "pvt"
    if f"{prefix}conv1_w" in state:
        raise CheckpointError(path, "the MSRA Caffe2 ResNet-50 (BGR input, stride in the 1x1 conv); AV2TS uses the "
                                    "torchvision ResNet-50 converted by detectron2 (stem.conv1.weight, res2.0...)")
    raise CheckpointError(path, f"cannot tell the backbone: no {prefix}stem.conv1.weight (ResNet-50) nor "
                                f"{prefix}patch_embed1.proj.weight (PVT-v2) key")


ARCH_PRESET = {"r50": "av2ts-r50", "pvt": "av2ts-pvt"}
ARCH_TIMM = {"r50": "resnet50", "pvt": "pvt_v2_b5"}


def conversion_target(arch: str | None, path, preset, subset, siam, base):
    """(model, cfg, base config doc or None) to convert into: the ``base`` checkpoint, or a fresh preset model
    (``preset``, ``subset``, ``siam``; None: the defaults of ``arch``, a backbone file's architecture, or
    av2ts-r50). ``path``: the converter's input, named in errors. Shared with ``convert_combo``."""
    from av2ts_cli.model import build_model  # local: the network imports torch and timm

    if base is not None:
        if preset or subset or siam is not None:
            raise UsageError("--base gives the architecture: do not combine it with --preset/--subset/--siam")
        model, cfg, doc = load_checkpoint_files(find_checkpoint(base))
        if arch and cfg.backbone != ARCH_TIMM[arch]:
            raise UsageError(f"{path}: a {ARCH_TIMM[arch]} file does not fit --base {base} "
                             f"(backbone {cfg.backbone})")
        return model, cfg, doc
    preset = preset or ARCH_PRESET.get(arch, "av2ts-r50")
    if arch and preset != ARCH_PRESET[arch]:
        raise UsageError(f"{path}: a {ARCH_TIMM[arch]} file does not fit --preset {preset}")
    cfg = get_preset(preset, subset or "s4", siam)
    return build_model(cfg), cfg, None


def config_from_keys(state: Mapping, path, preset, subset, siam, presets: Mapping[str, str], network: str):
    """``(arch, cfg)`` of a checkpoint written by a reference code base, read from its keys (backbone, Siam encoder,
    class count) and checked against the options given; ``presets`` maps "r50"/"pvt" to the family's preset,
    ``network`` names the code base in messages ("an AV2TS reference", "a COMBO")."""
    arch = backbone_of(state, "backbone.", path)
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

