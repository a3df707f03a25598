"""Checkpoints: the av2ts format and where a model comes from.

An av2ts checkpoint is a folder holding two files:

- ``model.safetensors``: every tensor of ``model.state_dict()`` (parameters and persistent buffers, the frozen
  batch-norm statistics included), with a small str->str header (``format``, ``av2ts_format``, ``av2ts_version``);
- ``config.json``: ``{"format": "av2ts-checkpoint", "format_version", "av2ts_version", "preset", "subset",
  "classes", "num_frames", "input_size", "trained_on", "model": ModelConfig.to_dict(), "meta": {...}}``. Only
  ``"model"`` is read back to build the network; the other fields describe it for people and tools.

``resolve_model(name)`` is THE one resolver of ``--model``; it accepts, in this order: a preset name (only with
``presets=True``: a randomly initialised network); a local checkpoint folder (or a ``.safetensors`` file with
``config.json`` beside it); ``hf://owner/repo[@revision][/subfolder]`` through huggingface_hub (its cache and
``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` / ``HF_HOME``); a name of ``REGISTRY``. Building a model never downloads.

What is published upstream (checked from public sources; docs/model.md, "Checkpoints and the reference key
mapping"): no trained AV2TS weights exist anywhere. COMBO's S4 checkpoints (``hf://YannQi/COMBO-AVS-checkpoints``)
are a different network (VGGish audio, bilateral fusion, 100 queries, 9 decoder layers, 3 memory levels) and cannot
be loaded into AV2TS.

Importers of upstream files (``av2ts convert``: rename rules, converters, safe readers) live in ``convert.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from av2ts_cli import __version__
from av2ts_cli.avsbench import subsets_compatible
from av2ts_cli.config import PRESET_NAMES, ModelConfig, get_preset
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.files import atomic_folder, fsync_file, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = "av2ts-checkpoint"
FORMAT_VERSION = 1
HF_PREFIX = "hf://"


def _find_demo_model_dir() -> Path:
    """``assets/demo-model`` of a source checkout, or its copy inside the installed package (wheel)."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "assets" / "demo-model", package_dir.parent / "assets" / "demo-model"):
        if candidate.is_dir():
            return candidate
    return package_dir.parent / "assets" / "demo-model"  # not built yet: the source-checkout location


DEMO_MODEL_DIR = _find_demo_model_dir()


# ------------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class RegistryEntry:
    """A short model name: where its weights are, or why there are none to load."""

    source: str | None  # a local folder or an hf:// id; None: nothing loadable exists
    description: str
    convert_kind: str | None = None  # set when the source is an upstream file that `av2ts convert` imports


REGISTRY: dict[str, RegistryEntry] = {
    "demo": RegistryEntry(
        str(DEMO_MODEL_DIR),
        "av2ts-tiny trained on the synthetic 'sounding shapes' data shipped with av2ts (a demo, not a real model)"),
    "combo-r50-s4": RegistryEntry(
        None,
        "COMBO (CVPR'24) R50 S4 checkpoint on hf://YannQi/COMBO-AVS-checkpoints: a different network (VGGish audio, "
        "bilateral fusion, 100 queries, 9 decoder layers), not loadable into AV2TS"),
    "combo-pvt-s4": RegistryEntry(
        None,
        "COMBO (CVPR'24) PVT-v2-b5 S4 checkpoint on hf://YannQi/COMBO-AVS-checkpoints: a different network, "
        "not loadable into AV2TS"),
    "ced-mini": RegistryEntry(
        # no revision is pinned: the commit hash of the repository could not be checked from here
        "hf://mispeech/ced-mini",
        "CED-Mini audio encoder (transformers safetensors), the audio part of AV2TS only", convert_kind="ced-hf"),
}


# ---------------------------------------------------------------------------------------------------------- save
def _class_names(cfg, meta: Mapping) -> list[str]:
    names = meta.get("classes") or getattr(cfg, "class_names", None)
    if names:
        names = [str(n) for n in names]
        if len(names) != cfg.num_classes:
            raise UsageError(f"{len(names)} class names given for a model with {cfg.num_classes} classes")
        return names
    from av2ts_cli.data.classes import AVSS_CLASSES, BINARY_CLASSES  # local: av2ts_cli.data loads torch

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


# ------------------------------------------------------------------------------------------------------- resolve
@dataclass(frozen=True)
class ResolvedCheckpoint:
    """The two files of a checkpoint, and how the user named it (for messages)."""

    weights: Path
    config: Path
    label: str


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None
    subfolder: str | None

    @property
    def label(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HF_PREFIX}{self.repo_id}{rev}{sub}"


_HUB_RE = re.compile(r"^hf://(?P<owner>[\w.\-]+)/(?P<repo>[\w.\-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+?))?/?$")


def parse_hub_ref(text: str) -> HubRef:
    """``hf://owner/repo[@revision][/subfolder]`` (a revision is a branch, tag or commit without '/')."""
    match = _HUB_RE.match(text)
    if not match:
        raise UsageError(f"{text}: not a Hugging Face reference; expected hf://owner/repo[@revision][/subfolder]")
    return HubRef(f"{match['owner']}/{match['repo']}", match["rev"], match["sub"])


def hub_download(ref: HubRef, filename: str) -> Path:
    """One file of a hub repository through the huggingface_hub cache; every failure is one CheckpointError line."""
    # local: huggingface_hub takes ~0.3 s to import; only hf:// needs it. Imported first: it configures its logger
    from huggingface_hub import constants, hf_hub_download

    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.23 keeps them in utils
        from huggingface_hub import utils as errors
    where = f"{ref.subfolder}/{filename}" if ref.subfolder else filename
    revision = ref.revision or "main"
    fetch = (f"fetch it once online (`hf download {ref.repo_id} {where} --revision {revision}`, or the same av2ts "
             "command without HF_HUB_OFFLINE)")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would break the one-line error of the CLI
    try:
        return Path(hf_hub_download(ref.repo_id, filename, subfolder=ref.subfolder, revision=ref.revision))
    except errors.RepositoryNotFoundError:
        reason = "repository not found on the Hugging Face Hub (or private/gated: log in with `hf auth login`)"
    except errors.RevisionNotFoundError:
        reason = f"revision {revision!r} not found in the repository"
    except errors.LocalEntryNotFoundError:  # offline, or no connection, and not in the cache
        cache = constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        reason = f"{where} (revision {revision}) is not in the Hugging Face cache {cache} and {why}; {fetch}"
    except errors.EntryNotFoundError:
        reason = f"{where} not found in the repository at revision {revision}"
    except errors.HfHubHTTPError as err:
        reason = f"Hugging Face Hub error for {where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    except (OSError, ValueError) as err:  # network failures surface as OSError subclasses (requests / httpx)
        reason = f"could not download {where}: {type(err).__name__}: {err}"
    except Exception as err:  # httpx errors are not OSErrors
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3", "httpcore"):
            raise
        reason = f"could not reach the Hugging Face Hub for {where}: {type(err).__name__}: {err}"
    finally:
        hub_logger.setLevel(level)
    raise CheckpointError(ref.label, reason)


def resolve_checkpoint(name_or_path: str | os.PathLike) -> ResolvedCheckpoint:
    """Find the two files of a checkpoint: a local folder or file, an hf:// reference, or a registry name."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            weights, config = path / WEIGHTS_FILE, path / CONFIG_FILE
            for needed in (weights, config):
                if not needed.is_file():
                    hint = " (a checkpoint folder holds model.safetensors and config.json)"
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
        if entry.source is None or entry.convert_kind:
            how = (f"; import it with `av2ts convert {entry.source} --kind {entry.convert_kind} ...`"
                   if entry.convert_kind else "")
            raise CheckpointError(text, f"{entry.description}{how}")
        if not entry.source.startswith(HF_PREFIX) and not Path(entry.source).is_dir():
            raise CheckpointError(entry.source, f"the '{text}' model folder is missing from this installation")
        return resolve_checkpoint(entry.source)
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


def model_config_from(doc: dict, path: str | os.PathLike):
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


def load_checkpoint(name_or_path: str | os.PathLike):
    """``(model, cfg, config document)`` of a checkpoint (any source ``resolve_checkpoint`` accepts), eval mode."""
    import torch  # local: torch takes seconds to import; `--help` and `info` without a model skip it

    from av2ts_cli.model import build_model  # local: the network imports torch

    resolved = resolve_checkpoint(name_or_path)
    doc = read_checkpoint_config(resolved.config)
    cfg = model_config_from(doc, resolved.config)
    state = read_safetensors(resolved.weights)
    model = build_model(cfg)
    check_state_dict(model.state_dict(), state, resolved.weights)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval(), cfg, doc


def resolve_model(name: str | os.PathLike, *, subset: str | None = None, presets: bool = False, device="cpu"):
    """THE one resolver of ``--model``: ``(model, cfg, config document)``, eval mode, on ``device``.

    With ``presets=True`` a preset name (``config.PRESET_NAMES``) that is not an existing path builds a randomly
    initialised network for ``subset`` (s4 when None); its document is what ``save_checkpoint`` would write. Any
    other name is a checkpoint: a folder or file, ``hf://owner/repo[@rev][/sub]`` or a ``REGISTRY`` name. Anything
    else is a UsageError naming the accepted forms. With ``subset``, a checkpoint must fit it
    (``avsbench.subsets_compatible``) and ``cfg.subset`` is set to it.
    """
    text = str(name)
    exists = Path(text).expanduser().exists()
    if presets and not exists and text in PRESET_NAMES:
        from av2ts_cli.model import build_model  # local: torch, loaded only when a network is built

        cfg = get_preset(text, subset or "s4")
        return build_model(cfg).to(device).eval(), cfg, checkpoint_config(cfg)
    if not (exists or text.startswith(HF_PREFIX) or text in REGISTRY):
        forms = "a checkpoint folder or .safetensors file, hf://owner/repo[@revision][/subfolder], or a model name " \
                f"({', '.join(sorted(REGISTRY))})"
        if presets:
            raise UsageError(f"--model {text}: no such file or folder, and neither a preset "
                             f"({', '.join(PRESET_NAMES)}) nor a checkpoint ({forms})")
        if text in PRESET_NAMES:
            raise UsageError(f"--model {text}: is a preset (an architecture), not a checkpoint: no trained AV2TS "
                             f"weights are published; pass {forms}")
        raise UsageError(f"--model {text}: no such file or folder, and not a checkpoint ({forms})")
    model, cfg, doc = load_checkpoint(text)
    if subset is not None:
        if not subsets_compatible(cfg.subset, subset):
            raise UsageError(f"{text} is a {cfg.subset} model; --subset is {subset}")
        cfg = dataclasses.replace(cfg, subset=subset)
    return model.to(device), cfg, doc


def load_model(name_or_path: str | os.PathLike, device="cpu", allow_random_init: bool = False):
    """``(model, cfg)`` of ``resolve_model`` (``allow_random_init``: its ``presets``)."""
    model, cfg, _ = resolve_model(name_or_path, presets=allow_random_init, device=device)
    return model, cfg


# ------------------------------------------------------------------------------------------------ describe (info)
# top-level module of the network -> the part ``av2ts info --model`` reports it in
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


def part_of(key: str) -> str:
    """The part of the network (a PARTS value) that a state-dict key belongs to."""
    return PARTS.get(key.split(".", 1)[0], "other")


def describe_parameters(name_or_path: str, subset: str | None = None) -> dict:
    """Parameter counts per part (trainable and frozen) of a preset (built for ``subset``, s4 if None, random init)
    or any checkpoint (``resolve_model``)."""
    text = str(name_or_path)
    model, cfg, _ = resolve_model(text, subset=subset, presets=True)
    counts: dict[str, dict[str, int]] = {}
    for part in dict.fromkeys(PARTS.values()):
        counts[part] = {"parameters": 0, "trainable": 0, "frozen": 0}
    for key, param in model.named_parameters():
        entry = counts.setdefault(part_of(key), {"parameters": 0, "trainable": 0, "frozen": 0})
        entry["parameters"] += param.numel()
        entry["trainable" if param.requires_grad else "frozen"] += param.numel()
    parts = [{"part": part, **c} for part, c in counts.items() if c["parameters"] or part in PARTS.values()]
    total = {k: sum(p[k] for p in parts) for k in ("parameters", "trainable", "frozen")}
    return {"name": text, "preset": cfg.preset, "subset": cfg.subset, "num_classes": cfg.num_classes,
            "siam": cfg.siam, "parts": parts, "total": total}
