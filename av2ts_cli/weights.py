"""Checkpoints: the av2ts format, where a model comes from, and converters from upstream files.

An av2ts checkpoint is a folder holding two files:

- ``model.safetensors``: every tensor of ``model.state_dict()`` (parameters and persistent buffers, the frozen
  batch-norm statistics included), with a small str->str header (``format``, ``av2ts_format``, ``av2ts_version``);
- ``config.json``: ``{"format": "av2ts-checkpoint", "format_version", "av2ts_version", "preset", "subset",
  "classes", "num_frames", "input_size", "trained_on", "model": ModelConfig.to_dict(), "meta": {...}}``. Only
  ``"model"`` is read back to build the network; the other fields describe it for people and tools.

``load_model(name_or_path)`` resolves, in this order: a local checkpoint folder (or a ``.safetensors`` file with
``config.json`` beside it); ``hf://owner/repo[@revision][/subfolder]`` through huggingface_hub (its cache and
``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` / ``HF_HOME``); a name of ``REGISTRY``. A preset name gives a randomly
initialised model only when asked for explicitly (``allow_random_init=True``). Building a model never downloads.

What is published upstream (checked from public sources, see model.md section 12): no trained AV2TS weights exist
anywhere. COMBO's S4 checkpoints (``hf://YannQi/COMBO-AVS-checkpoints``) are a different network (VGGish audio,
bilateral fusion, 100 queries, 9 decoder layers, 3 memory levels) and cannot be loaded into AV2TS. The upstream
files that *are* useful are initialisations, imported with ``av2ts convert``:

- ``--kind reference``: a checkpoint trained with the reference code (OrigamiSL/AV2TS on detectron2), a torch file
  ``{"model": state_dict}`` in the layout of model.md section 12 -> a full av2ts checkpoint;
- ``--kind detectron2``: the backbone pickles ``R-50.pkl`` / ``d2_pvt_v2_b5.pkl`` -> the visual backbone and the
  Siam encoder (both from the same file, as the reference does) of a new or given checkpoint;
- ``--kind ced`` / ``ced-hf``: CED-Mini from ``audiotransformer_mini_mAP_4896.pt`` (Zenodo) or from the
  transformers conversion ``hf://mispeech/ced-mini`` -> the audio encoder.

Foreign files are read only with ``torch.load(weights_only=True)``, safetensors, or (detectron2 pickles) an
unpickler that allows exactly the numpy globals needed to rebuild arrays and refuses anything else.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from av2ts_cli import __version__
from av2ts_cli.errors import CheckpointError, UsageError

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
    from av2ts_cli.data.classes import AVSS_CLASSES, BINARY_CLASSES

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

    Both files are written to a temporary folder beside ``folder``, which then takes its place. An existing
    checkpoint folder is replaced; files in it that are not ours (e.g. a trainer's ``trainer.pt``) are kept.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(folder, "exists and is not a folder; a checkpoint is a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    doc = checkpoint_config(cfg, meta)
    tensors = _tensors_for_saving(model.state_dict())
    header = {"format": "pt", "av2ts_format": f"{CHECKPOINT_FORMAT}/{FORMAT_VERSION}", "av2ts_version": __version__}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=header)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        for path in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(new: Path, folder: Path) -> None:
    """Make ``new`` become ``folder``; the old folder is renamed away first and removed only after the swap."""
    if not folder.exists():
        os.replace(new, folder)
        return
    for extra in folder.iterdir():  # carry over files that are not part of the checkpoint itself
        if extra.name not in (WEIGHTS_FILE, CONFIG_FILE):
            target = new / extra.name
            if extra.is_dir():
                shutil.copytree(extra, target, symlinks=True)
            else:
                shutil.copy2(extra, target, follow_symlinks=False)
    old = folder.parent / f".{folder.name}.{os.getpid()}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    from huggingface_hub import constants, hf_hub_download  # imported first: its import configures its logger

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
    if _is_preset(text):
        raise CheckpointError(text, "is a preset (an architecture), not a checkpoint: no trained AV2TS weights are "
                                    "published; pass a checkpoint folder, hf://owner/repo, or a name of "
                                    f"{', '.join(sorted(REGISTRY))}")
    raise CheckpointError(text, "no such file or folder, not an hf:// reference, and not a known model name "
                                f"({', '.join(sorted(REGISTRY))})")


def _is_preset(name: str) -> bool:
    from av2ts_cli.config import PRESET_NAMES

    return name in PRESET_NAMES


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
    from av2ts_cli.config import ModelConfig

    try:
        return ModelConfig.from_dict(doc["model"])
    except UsageError as err:
        raise CheckpointError(path, f"invalid model configuration: {err.message}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"invalid model configuration: {err}") from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"unreadable safetensors file: {err}") from None


def _first(keys: Iterable[str], n: int = 3) -> str:
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
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if wrong:
        wrong.sort()
        shown = ", ".join(f"{k} {list(given[k].shape)} vs model {list(expected[k].shape)}" for k in wrong[:3])
        problems.append(f"{len(wrong)} shape mismatches ({shown}{' ...' if len(wrong) > 3 else ''})")
    if problems:
        raise CheckpointError(path, "does not fit the model of its config: " + "; ".join(problems))


def load_checkpoint(name_or_path: str | os.PathLike):
    """``(model, cfg, config document)`` of a checkpoint (any source ``resolve_checkpoint`` accepts), eval mode."""
    import torch

    from av2ts_cli.model import build_model

    resolved = resolve_checkpoint(name_or_path)
    doc = read_checkpoint_config(resolved.config)
    cfg = model_config_from(doc, resolved.config)
    state = read_safetensors(resolved.weights)
    model = build_model(cfg)
    check_state_dict(model.state_dict(), state, resolved.weights)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval(), cfg, doc


def load_model(name_or_path: str | os.PathLike, device="cpu", allow_random_init: bool = False):
    """``(model, cfg)`` from a checkpoint folder or file, an hf:// reference or a registry name (eval mode).

    With ``allow_random_init=True`` a preset name (``config.PRESET_NAMES``) gives a randomly initialised model.
    """
    from av2ts_cli.config import get_preset
    from av2ts_cli.model import build_model

    text = str(name_or_path)
    if allow_random_init and not Path(text).exists() and _is_preset(text):
        cfg = get_preset(text)
        return build_model(cfg).to(device).eval(), cfg
    model, cfg, _ = load_checkpoint(text)
    return model.to(device), cfg


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


def _part_of(key: str) -> str:
    return PARTS.get(key.split(".", 1)[0], "other")


def describe_parameters(name_or_path: str, subset: str = "s4") -> dict:
    """Parameter counts per part (trainable and frozen) of a preset (built, random init) or any checkpoint."""
    from av2ts_cli.config import get_preset
    from av2ts_cli.model import build_model

    text = str(name_or_path)
    if not Path(text).exists() and _is_preset(text):
        cfg = get_preset(text, subset)
        model = build_model(cfg)
    else:
        model, cfg = load_model(text)
    counts: dict[str, dict[str, int]] = {}
    for part in dict.fromkeys(PARTS.values()):
        counts[part] = {"parameters": 0, "trainable": 0, "frozen": 0}
    for key, param in model.named_parameters():
        entry = counts.setdefault(_part_of(key), {"parameters": 0, "trainable": 0, "frozen": 0})
        entry["parameters"] += param.numel()
        entry["trainable" if param.requires_grad else "frozen"] += param.numel()
    parts = [{"part": part, **c} for part, c in counts.items() if c["parameters"] or part in PARTS.values()]
    total = {k: sum(p[k] for p in parts) for k in ("parameters", "trainable", "frozen")}
    return {"name": text, "preset": cfg.preset, "subset": cfg.subset, "num_classes": cfg.num_classes,
            "siam": cfg.siam, "parts": parts, "total": total}


# ------------------------------------------------------------------------------------------- reading foreign files
# Exactly what a pickle of a dict of numpy arrays needs (numpy 1.x names its module numpy.core, 2.x numpy._core;
# _codecs.encode carries the raw bytes of arrays pickled with protocol 2, e.g. by Python 2).
NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("_codecs", "encode"), ("collections", "OrderedDict"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, numbers, strings and numpy arrays; any other global is refused before it is touched."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # detectron2's own loader uses latin1 for Python-2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in NUMPY_PICKLE_GLOBALS:
            raise CheckpointError(self.path, f"refusing to unpickle the global {module}.{name}: only plain dicts of "
                                             "numpy arrays are accepted from .pkl files")
        import importlib

        if module.startswith("numpy.core."):  # numpy 2 keeps the old path only as a deprecated alias
            try:
                importlib.import_module("numpy._core.multiarray")
                module = module.replace("numpy.core.", "numpy._core.", 1)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise CheckpointError(self.path, "refusing a pickle with persistent ids (not a plain dict of numpy arrays)")


def read_numpy_pickle(path: str | os.PathLike):
    """The object of a detectron2-style ``.pkl`` (dicts of numpy arrays), through the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(path, f"unreadable pickle: {type(err).__name__}: {err}") from None


def read_torch_weights(path: str | os.PathLike):
    """A ``torch.save`` file through ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    import torch

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
    import numpy as np
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
CONVERT_KINDS = ("reference", "detectron2", "ced", "ced-hf")


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
        problems.append(f"{len(unknown)} keys of no known layout ({_first(unknown)})")
    if absent:
        problems.append(f"{len(absent)} keys with no place in the av2ts model ({_first(absent)})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({_first(wrong)})")
    if twice:
        problems.append(f"{len(twice)} av2ts tensors given twice ({_first(twice)})")
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    return result


def fill_model(model, mapping: KeyMapping, required_prefixes: Iterable[str], path: str | os.PathLike) -> None:
    """Copy the mapped tensors into ``model``; every tensor under ``required_prefixes`` must have been given."""
    import torch

    target = model.state_dict()
    required = [k for k in target if any(k.startswith(p) for p in required_prefixes)]
    missing = [k for k in required if k not in mapping.tensors]
    if missing:
        raise CheckpointError(path, f"leaves {len(missing)} av2ts tensors unfilled ({_first(missing)})")
    with torch.no_grad():
        incompatible = model.load_state_dict(mapping.tensors, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys


def _source_file(source: str) -> Path:
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


def _build_target(arch: str | None, path, preset, subset, siam, base):
    """(model, cfg, base config doc or None) to convert into: the ``base`` checkpoint, or a fresh preset model."""
    from av2ts_cli.config import get_preset
    from av2ts_cli.model import build_model

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


def _reference_config(state: Mapping, path, preset, subset, siam):
    from av2ts_cli.config import get_preset

    arch = _backbone_of(state, "backbone.", path)
    if preset and preset != _ARCH_PRESET[arch]:
        raise UsageError(f"{path}: holds a {_ARCH_TIMM[arch]} model, not {preset}")
    has_siam = any(k.startswith("pre_sam_backbone.") for k in state)
    if siam is not None and siam != has_siam:
        raise UsageError(f"{path}: the checkpoint {'has' if has_siam else 'has no'} Siam encoder "
                         f"(pre_sam_backbone); --{'no-' if siam is False else ''}siam contradicts it")
    class_key = "sem_seg_head.predictor.class_embed.weight"
    if class_key not in state:
        raise CheckpointError(path, f"no {class_key}: not an AV2TS reference checkpoint")
    num_classes = state[class_key].shape[0] - 1  # the last class is "no object"
    if subset is None:
        subset = {2: "s4", 71: "avss"}.get(num_classes)
        if subset is None:
            raise CheckpointError(path, f"{num_classes} classes: no AVSBench subset has that many")
    cfg = get_preset(_ARCH_PRESET[arch], subset, has_siam)
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
    from av2ts_cli.model import build_model

    if kind not in CONVERT_KINDS:
        raise UsageError(f"unknown --kind {kind!r}; choose from {', '.join(CONVERT_KINDS)}")
    path = _source_file(source)
    state = read_state_dict_file(path)
    base_doc = None
    if kind == "reference":
        if base is not None:
            raise UsageError("--base does not apply to --kind reference: the checkpoint gives every tensor")
        arch, cfg = _reference_config(state, path, preset, subset, siam)
        model = build_model(cfg)
        groups = [(src, dst, rules) for src, dst, rules in _REFERENCE_PREFIXES[arch]] + [("", "", REFERENCE_RULES)]
        required = [""]
        trained_on = f"unknown: converted from the reference-implementation checkpoint {path.name}"
    elif kind == "detectron2":
        arch = _backbone_of(state, "", path)
        model, cfg, base_doc = _build_target(arch, path, preset, subset, siam, base)
        rules = D2_RESNET_RULES if arch == "r50" else PVT_RULES
        required = ["backbone."] + (["siam_backbone."] if cfg.siam else [])
        groups = [("", prefix, rules) for prefix in required]
        trained_on = None
    else:
        model, cfg, base_doc = _build_target(None, path, preset, subset, siam, base)
        groups = [("", "audio_encoder.", CED_RULES if kind == "ced" else CED_HF_RULES)]
        required = ["audio_encoder."]
        trained_on = None
    mapping = map_state_dict(state, groups, model.state_dict(), path)
    fill_model(model, mapping, required, path)
    meta = dict((base_doc or {}).get("meta") or {})
    history = list(meta.get("initialised_from") or [])
    history.append({"kind": kind, "source": source, "parts": sorted({_part_of(k) for k in mapping.tensors})})
    meta["initialised_from"] = history
    if base_doc is not None:
        meta["trained_on"] = base_doc.get("trained_on")
        meta["classes"] = base_doc.get("classes")
    else:
        meta["trained_on"] = trained_on
    return model.eval(), cfg, mapping, meta


def convert_to_checkpoint(source: str, kind: str, out: str | os.PathLike, **options) -> dict:
    """``convert`` then ``save_checkpoint`` into ``out``; returns a JSON-ready summary."""
    out = Path(out)
    if options.get("base") and Path(options["base"]).expanduser().resolve() == out.expanduser().resolve():
        raise UsageError("--out must differ from --base: inputs are never overwritten")
    source_path = Path(source).expanduser()
    if source_path.exists() and source_path.resolve() == out.expanduser().resolve():
        raise UsageError("--out must differ from the source file")
    model, cfg, mapping, meta = convert(source, kind, **options)
    save_checkpoint(model, cfg, out, meta)
    parts: dict[str, int] = {}
    for key in mapping.tensors:
        parts[_part_of(key)] = parts.get(_part_of(key), 0) + 1
    reasons: dict[str, int] = {}
    for reason in mapping.dropped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"out": str(out), "kind": kind, "source": source, "preset": cfg.preset, "subset": cfg.subset,
            "num_classes": cfg.num_classes, "siam": cfg.siam, "filled_tensors": len(mapping.tensors),
            "source_tensors_used": len(set(mapping.origin.values())), "filled_per_part": parts,
            "dropped": reasons}


def print_conversion_report(report: dict) -> None:
    from rich.table import Table

    from av2ts_cli.console import console

    table = Table(title=f"{report['preset']}, {report['subset']}, {report['num_classes']} classes, Siam encoder "
                        f"{'on' if report['siam'] else 'off'}")
    table.add_column(f"part filled from {report['kind']}")
    table.add_column("tensors", justify="right")
    for part in dict.fromkeys(PARTS.values()):
        if part in report["filled_per_part"]:
            table.add_row(part, str(report["filled_per_part"][part]))
    console.print(table)
    for reason, count in report["dropped"].items():
        console.print(f"dropped {count} source tensors: {reason}")
    console.print(f"Checkpoint saved to {report['out']}")
