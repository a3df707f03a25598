"""The av2ts checkpoint format: writing one, reading one from its two files, and checking that they fit.

An av2ts checkpoint is a folder holding two files:

- ``model.safetensors``: every tensor of ``model.state_dict()`` (parameters and persistent buffers, the frozen
  batch-norm statistics included), with a small str->str header (``format``, ``av2ts_format``, ``av2ts_version``);
- ``config.json``: ``{"format": "av2ts-checkpoint", "format_version", "av2ts_version", "preset", "subset",
  "classes", "num_frames", "input_size", "trained_on", "model": ModelConfig.to_dict(), "meta": {...}}``. Only
  ``"model"`` is read back to build the network (``model.family`` picks it); the other fields describe it.

``find_checkpoint`` finds the two files of a folder, an ``hf://`` reference or a ready registry name; the one
resolver of ``--model`` (registry models converted on use, presets) is ``resolve.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from av2ts_cli import __version__
from av2ts_cli.avsbench import SUBSET_CLASSES
from av2ts_cli.config import FAMILIES, PRESET_NAMES, ModelConfig, get_preset
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.files import atomic_folder, fsync_file, write_json
from av2ts_cli.weights.hub import HF_PREFIX, hub_download, parse_hub_ref
from av2ts_cli.weights.registry import REGISTRY

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = "av2ts-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """The two files of a checkpoint, and how the user named it (for messages)."""

    weights: Path
    config: Path
    label: str



# ---------------------------------------------------------------------------------------------------------- save
def _class_names(cfg, meta: Mapping) -> list[str]:
    names = meta.get("classes") or getattr(cfg, "class_names", None)
    if names:
        names = [str(n) for n in names]
        if len(names) != cfg.num_classes:
            raise UsageError(f"{len(names)} class names given for a model with {cfg.num_classes} classes")
        return names
    from av2ts_cli.classes import AVSS_CLASSES, BINARY_CLASSES  # local: numpy, only when a checkpoint names no classes

    for known in (BINARY_CLASSES, AVSS_CLASSES):
        if cfg.num_classes == len(known):
            return list(known)
    return ["background"] + [f"class_{i}" for i in range(1, cfg.num_classes)]


def checkpoint_config(cfg, meta: Mapping | None = None) -> dict:
    """The ``config.json`` document of a checkpoint of ``cfg`` (``meta``: trained_on, classes, anything else)."""
    meta = dict(meta or {})
    doc = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "av2ts_version": __version__,
        "preset": cfg.preset,
        "subset": cfg.subset,
        "classes": _class_names(cfg, meta),
        "num_frames": cfg.num_frames,
        "input_size": cfg.input_size,
        "trained_on": meta.pop("trained_on", None),
        "model": cfg.to_dict(),
    }
    meta.pop("classes", None)
    doc["meta"] = meta
    return doc


def _tensors_for_saving(state: Mapping) -> dict:
    """Contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_checkpoint(model, cfg, folder: str | os.PathLike, meta: Mapping | None = None) -> Path:
    """Write ``model`` (+ its ``cfg``) as an av2ts checkpoint folder, atomically.

    Both files are written to a temporary folder beside ``folder``, which then takes its place
    (``files.atomic_folder``). An existing checkpoint folder is replaced; files in it that are not ours (e.g. a
    trainer's ``trainer.pt``) are kept.
    """
    from safetensors.torch import save_file  # local: safetensors.torch imports torch

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(folder, "exists and is not a folder; a checkpoint is a folder")
    doc = checkpoint_config(cfg, meta)
    tensors = _tensors_for_saving(model.state_dict())
    header = {"format": "pt", "av2ts_format": f"{CHECKPOINT_FORMAT}/{FORMAT_VERSION}", "av2ts_version": __version__}
    with atomic_folder(folder, carry_over_except=frozenset({WEIGHTS_FILE, CONFIG_FILE})) as temp:
        save_file(tensors, str(temp / WEIGHTS_FILE), metadata=header)
        write_json(temp / CONFIG_FILE, doc, durable=True)
        fsync_file(temp / WEIGHTS_FILE)
    return folder



# ------------------------------------------------------------------------------------------------------ find
def find_checkpoint(name_or_path: str | os.PathLike) -> ResolvedCheckpoint:
    """Find the two files of a checkpoint: a local folder or file, an hf:// reference, or a registry name of a ready
    checkpoint (one converted from an upstream file on first use is ``resolve.resolve_checkpoint``'s)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            weights, config = path / WEIGHTS_FILE, path / CONFIG_FILE
            for needed in (weights, config):
                if not needed.is_file():
                    runs = [name for name in ("best", "last") if (path / name / WEIGHTS_FILE).is_file()]
                    hint = (f" (a training run: pass {' or '.join(str(path / name) for name in runs)})" if runs
                            else " (a checkpoint folder holds model.safetensors and config.json)")
                    raise CheckpointError(path, f"no {needed.name} in this folder{hint}")
            return ResolvedCheckpoint(weights, config, text)
        if path.suffix == ".safetensors":
            config = path.with_name(CONFIG_FILE)
            if not config.is_file():
                raise CheckpointError(path, f"no {CONFIG_FILE} beside this weights file")
            return ResolvedCheckpoint(path, config, text)
        raise CheckpointError(path, "not an av2ts checkpoint (a folder with model.safetensors and config.json); "
                                    "upstream files are imported with `av2ts convert`")
    if text.startswith(HF_PREFIX):
        ref = parse_hub_ref(text)
        config = hub_download(ref, CONFIG_FILE)
        weights = hub_download(ref, WEIGHTS_FILE)
        return ResolvedCheckpoint(weights, config, text)
    if text in REGISTRY:
        entry = REGISTRY[text]
        if entry.converted_on_use:
            raise CheckpointError(text, "is converted from its upstream file on first use: pass it as --model "
                                        "(`av2ts download` fetches it ahead)")
        if entry.source is None or entry.convert_kind:
            how = (f"; import it with `av2ts convert {entry.source} --kind {entry.convert_kind} ...`"
                   if entry.convert_kind else "")
            raise CheckpointError(text, f"{entry.description}{how}")
        if not entry.source.startswith(HF_PREFIX) and not Path(entry.source).is_dir():
            raise CheckpointError(entry.source, f"the '{text}' model folder is missing from this installation")
        return find_checkpoint(entry.source)
    if text in PRESET_NAMES:
        raise CheckpointError(text, "is a preset (an architecture), not a checkpoint: no trained AV2TS weights are "
                                    "published; pass a checkpoint folder, hf://owner/repo, or a name of "
                                    f"{', '.join(sorted(REGISTRY))}")
    raise CheckpointError(text, "no such file or folder, not an hf:// reference, and not a known model name "
                                f"({', '.join(sorted(REGISTRY))})")


# ---------------------------------------------------------------------------------------------------------- load
def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a checkpoint, checked to be ours."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"unreadable config: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT or not isinstance(doc.get("model"), dict):
        raise CheckpointError(path, f"not an av2ts checkpoint config (expected \"format\": \"{CHECKPOINT_FORMAT}\" "
                                    "and a \"model\" section)")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(path, f"written by a newer av2ts ({doc.get('av2ts_version')}, format "
                                    f"{doc.get('format_version')}); upgrade av2ts to read it")
    return doc


def _shown(value) -> str:
    """A config value as the message quotes it: JSON text ('s4' as "s4", true, 71)."""
    return json.dumps(value)


def _config_contradiction(doc: dict) -> str | None:
    """The first field of a checkpoint's ``config.json`` that names something unknown or contradicts another field,
    as one phrase naming the field by its JSON path (``"model.num_classes" is 71 but "model.subset" "s4" has 2
    classes``), or None. Checked before the network is built, so that a lying config is refused by its field,
    not by a list of mismatched tensors or a network of the wrong size."""
    model = doc["model"]
    preset = model.get("preset")
    base = None
    if preset is not None:
        if preset not in PRESET_NAMES:
            return f'"model.preset" is {_shown(preset)}, not a preset of this av2ts ({", ".join(PRESET_NAMES)})'
        base = get_preset(preset, "s4")
    family = model.get("family", base.family if base is not None else ModelConfig.family)
    if family not in FAMILIES:
        return f'"model.family" is {_shown(family)}, not one of {", ".join(FAMILIES)}'
    if base is not None and family != base.family:
        return f'"model.family" is {_shown(family)} but "model.preset" {_shown(preset)} is of the {base.family} family'
    subset = model.get("subset", ModelConfig.subset)
    if subset not in SUBSET_CLASSES:
        return f'"model.subset" is {_shown(subset)}, not one of {", ".join(SUBSET_CLASSES)}'
    classes = model.get("num_classes", SUBSET_CLASSES[subset])
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        return f'"model.num_classes" is {_shown(classes)}, not a class count (2 or more, background included)'
    # S4 and MS3 are binary (background, sounding object); AVSS may have its own label2idx.json, of any length
    if subset != "avss" and classes != SUBSET_CLASSES[subset]:
        return (f'"model.num_classes" is {classes} but "model.subset" {_shown(subset)} has '
                f"{SUBSET_CLASSES[subset]} classes (background and sounding object)")
    for field in ("preset", "subset", "num_frames", "input_size"):  # the descriptive copies of the top level
        if field in doc and doc[field] is not None and field in model and doc[field] != model[field]:
            return f'"{field}" is {_shown(doc[field])} but "model.{field}" is {_shown(model[field])}'
    names = doc.get("classes")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return '"classes" is not a list of class names'
        if len(names) != classes:
            return f'"classes" lists {len(names)} names but "model.num_classes" is {classes}'
    return None


def model_config_from(doc: dict, path: str | os.PathLike):
    """The ``ModelConfig`` of a checkpoint's config document; a CheckpointError naming ``path`` and the field when
    a field is unknown, invalid or contradicts another (``_config_contradiction``)."""
    problem = _config_contradiction(doc)
    if problem is not None:
        raise CheckpointError(path, problem)
    try:
        return ModelConfig.from_dict(doc["model"])
    except UsageError as err:
        raise CheckpointError(path, f"invalid model configuration: {err.message}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"invalid model configuration: {err}") from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors import SafetensorError  # local: safetensors.torch imports torch
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"unreadable safetensors file: {err}") from None


def first_keys(keys: Iterable[str], n: int = 3) -> str:
    """'a, b, c and 4 more': the first n of some state-dict keys, for error messages."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# the keys whose shapes tell what a network is, whatever its family (model/decoder.py MaskedAttentionDecoder)
CLASS_HEAD = "decoder.class_embed.weight"  # [K + 1, hidden_dim]: K classes and the no-object logit
DSTA_PREFIX = "acoustic_attention."  # AV2TS's temporal attention; COMBO has none
SIAM_PREFIX = "siam_backbone."  # the Siam encoder of the maskiges (cfg.siam)


def check_tensors_fit_config(cfg, state: Mapping, config_path: str | os.PathLike,
                             weights_path: str | os.PathLike) -> None:
    """A CheckpointError naming ``config_path`` and the field when the tensors of ``state`` (name -> tensor) say
    another network than ``cfg`` does: the class count, the width, the family, the Siam encoder. Read from the
    tensors' shapes and names before the network is built; what these do not cover, ``check_state_dict`` does."""
    name = Path(weights_path).name
    head = state.get(CLASS_HEAD)
    if head is not None and head.dim() == 2:
        shape = list(head.shape)
        if head.shape[0] - 1 != cfg.num_classes:
            raise CheckpointError(config_path, f'"model.num_classes" is {cfg.num_classes} but the class head in '
                                               f"{name} scores {head.shape[0] - 1} classes ({CLASS_HEAD} {shape}: "
                                               "the classes and the no-object logit)")
        if head.shape[1] != cfg.hidden_dim:
            raise CheckpointError(config_path, f'"model.hidden_dim" is {cfg.hidden_dim} but the tensors in {name} '
                                               f"are {head.shape[1]} wide ({CLASS_HEAD} {shape})")
    has_dsta = any(key.startswith(DSTA_PREFIX) for key in state)
    if cfg.family == "combo" and has_dsta:
        raise CheckpointError(config_path, f'"model.family" is "combo" but the tensors in {name} are an AV2TS '
                                           f"network's ({DSTA_PREFIX}* temporal attention)")
    if cfg.family == "av2ts" and not has_dsta and head is not None:
        raise CheckpointError(config_path, f'"model.family" is "av2ts" but the tensors in {name} have no '
                                           f"{DSTA_PREFIX}* (temporal attention): a COMBO network's?")
    has_siam = any(key.startswith(SIAM_PREFIX) for key in state)
    if cfg.siam != has_siam and head is not None:
        held = "hold no" if cfg.siam else "hold a"
        raise CheckpointError(config_path, f'"model.siam" is {_shown(cfg.siam)} but the tensors in {name} {held} '
                                           f"Siam encoder ({SIAM_PREFIX}*)")


def check_state_dict(expected: Mapping, given: Mapping, path: str | os.PathLike) -> None:
    """One CheckpointError naming ``path`` and the first keys at fault, if ``given`` does not fit ``expected``."""
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    wrong = [k for k in expected.keys() & given.keys() if tuple(expected[k].shape) != tuple(given[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({first_keys(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({first_keys(unexpected)})")
    if wrong:
        wrong.sort()
        shown = ", ".join(f"{k} {list(given[k].shape)} vs model {list(expected[k].shape)}" for k in wrong[:3])
        problems.append(f"{len(wrong)} shape mismatches ({shown}{' ...' if len(wrong) > 3 else ''})")
    if problems:
        raise CheckpointError(path, "does not fit the model of its config: " + "; ".join(problems))

def load_checkpoint_files(resolved: ResolvedCheckpoint):
    """``(model, cfg, config document)`` of a checkpoint's two files, eval mode: the config is checked field by
    field, then the tensors against it, before the network is built and filled."""
    import torch  # local: torch takes seconds to import (measured 2.5-16 s on the busy 2-core machine)

    from av2ts_cli.model import build_model  # local: the network imports torch

    doc = read_checkpoint_config(resolved.config)
    cfg = model_config_from(doc, resolved.config)
    state = read_safetensors(resolved.weights)
    check_tensors_fit_config(cfg, state, resolved.config, resolved.weights)
    model = build_model(cfg)
    check_state_dict(model.state_dict(), state, resolved.weights)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval(), cfg, doc


# ------------------------------------------------------------------------------------------------ describe (info)
# top-level module of the network -> the part ``av2ts info --model`` reports it in, per family (ModelConfig.family)
PARTS = {
    "backbone": "visual backbone",
    "siam_backbone": "siam encoder (+ gates)",
    "siam_gates": "siam encoder (+ gates)",
    "audio_encoder": "audio encoder (CED)",
    "acoustic_attention": "DSTA (temporal attention)",
    "visual_attention": "DSTA (temporal attention)",
    "pixel_decoder": "pixel decoder",
    "fusion": "fusion (downsampling + OSA)",
    "decoder": "transformer decoder",
}


COMBO_PARTS = {
    "backbone": "visual backbone",
    "siam_backbone": "siam encoder (+ gates)",
    "siam_gates": "siam encoder (+ gates)",
    "audio_encoder": "audio encoder (VGGish)",
    "pixel_decoder": "pixel decoder",
    "fusion": "fusion (bilateral + audio MLP)",
    "decoder": "transformer decoder",
}
VCT_PARTS = {
    "backbone": "visual backbone",
    "siam_backbone": "siam encoder (+ gates)",
    "siam_gates": "siam encoder (+ gates)",
    "audio_encoder": "audio encoder (VGGish conv map)",
    "audio_mlp": "audio tokens (MLP)",
    "pixel_decoder": "pixel decoder",
    "queries": "query generator (ProtoVCQ / VCQ)",
    "decoder": "transformer decoder",
    "alignment": "prototype alignment (PAC)",
}
AVSEGFORMER_PARTS = {
    "backbone": "visual backbone",
    "audio_encoder": "audio encoder (VGGish)",
    "audio_proj": "audio projection",
    "head": "head (encoder, query generator, decoder, mixer)",
}
FAMILY_PARTS = {"av2ts": PARTS, "combo": COMBO_PARTS, "vct": VCT_PARTS, "avsegformer": AVSEGFORMER_PARTS}


def parts_of_family(family: str = "av2ts") -> dict[str, str]:
    """{top-level module: part label} of a network family (AV2TS's for an unknown one)."""
    return FAMILY_PARTS.get(family, PARTS)


def part_of(key: str, family: str = "av2ts") -> str:
    """The part of the network (a ``parts_of_family(family)`` value) that a state-dict key belongs to."""
    return parts_of_family(family).get(key.split(".", 1)[0], "other")


# ------------------------------------------------------------------------------------------------- identity
HASHES_DIR = "weights-sha256"  # under config.cache_root(): one small record per weights file


def weights_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a weights file: what "the same model" means when ``predict`` decides whether a video is done
    (a retrained ``best/`` or the advancing ``last/`` of a running training has another). Hashed once per file
    version: the result is cached by the file's resolved path, size and modification time (a 700 MB checkpoint
    takes seconds to hash, a cached one a stat)."""
    import hashlib  # local: only predict's identity check needs it

    from av2ts_cli.config import cache_root  # local: as above

    path = Path(path).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = cache_root() / HASHES_DIR / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        cached = json.loads(record.read_text(encoding="utf-8"))
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, {**key, "sha256": digest.hexdigest()})
    except OSError:  # an unwritable cache costs a hash next time, nothing else
        pass
    return digest.hexdigest()
