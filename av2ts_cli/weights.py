"""Where a model comes from: ``resolve_model``, THE one resolver of ``--model``, and the registry models that are
converted from their upstream files on first use.

``resolve_model(name)`` accepts, in this order: a preset name (only with ``presets=True``: a randomly initialised
network); a local checkpoint folder (or a ``.safetensors`` file with ``config.json`` beside it);
``hf://owner/repo[@revision][/subfolder]``; a name of ``REGISTRY``. The checkpoint format and the plain sources are
``checkpoints.py``'s (re-exported here); this module adds the registry entries whose source is an upstream file:
the COMBO authors' trained S4 checkpoints (``combo-r50-s4``, ``combo-pvt-s4``; docs/model.md, 'COMBO').

A converted-on-use entry is resolved in four steps: list the files of its Hub repository (``HfApi.list_repo_files``;
offline, or with the Hub out of reach, the files of the cached snapshot), pick the one ``.pth`` of its model folder
(an error naming what was found when none or several match), ``hf_hub_download`` it into the Hugging Face cache,
and convert it once with ``convert_combo`` into av2ts's cache (``config.cache_root()/converted/``), keyed by the
downloaded file's content hash. The conversion runs under a file lock and is written with ``files.atomic_folder``:
two processes converting at once wait for one another and never see half a folder. A second use finds the converted
checkpoint and needs no network (``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path

from av2ts_cli.avsbench import subsets_compatible
from av2ts_cli.checkpoints import (
    CHECKPOINT_FORMAT,
    COMBO_HUB,
    COMBO_HUB_FOLDER,
    COMBO_PARTS,
    CONFIG_FILE,
    DEMO_MODEL_DIR,
    FAMILY_PARTS,
    FORMAT_VERSION,
    PARTS,
    REGISTRY,
    WEIGHTS_FILE,
    RegistryEntry,
    ResolvedCheckpoint,
    check_state_dict,
    checkpoint_config,
    first_keys,
    model_config_from,
    part_of,
    parts_of_family,
    read_checkpoint_config,
    read_safetensors,
    save_checkpoint,
)
from av2ts_cli.checkpoints import load_checkpoint as load_checkpoint_files
from av2ts_cli.checkpoints import resolve_checkpoint as resolve_checkpoint_files
from av2ts_cli.config import PRESET_NAMES, cache_root, get_preset
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.hub import HF_PREFIX, HubRef, hub_download, hub_unreachable, parse_hub_ref

__all__ = [
    "CHECKPOINT_FORMAT", "COMBO_HUB", "COMBO_HUB_FOLDER", "COMBO_PARTS", "CONFIG_FILE", "DEMO_MODEL_DIR",
    "FAMILY_PARTS", "FORMAT_VERSION", "HF_PREFIX", "PARTS", "REGISTRY", "WEIGHTS_FILE", "CheckpointError", "HubRef",
    "PreparedCheckpoint", "RegistryEntry", "ResolvedCheckpoint", "check_finite_output", "check_state_dict",
    "checkpoint_config",
    "converted_folder", "describe_parameters", "first_keys", "hub_download", "hub_unreachable",
    "list_hub_files", "load_checkpoint",
    "load_checkpoint_files", "load_model", "model_config_from", "parse_hub_ref", "part_of", "parts_of_family",
    "pick_hub_file", "prepare_registry_checkpoint", "read_checkpoint_config", "read_safetensors",
    "resolve_checkpoint", "resolve_model", "save_checkpoint",
]

CONVERTED_DIR = "converted"  # under config.cache_root()


# ------------------------------------------------------------------------------------- hub files of an entry
def _hub():
    # local: huggingface_hub takes ~0.3 s to import; only registry models from the Hub need it
    import huggingface_hub
    from huggingface_hub import HfApi, constants  # local: as above (constants is a lazily loaded submodule)

    try:
        from huggingface_hub import errors  # local: as above
    except ImportError:  # huggingface_hub < 0.23 keeps them in utils
        from huggingface_hub import utils as errors  # local: as above
    return huggingface_hub, HfApi, constants, errors


def _cached_snapshot(ref: HubRef) -> Path | None:
    """The cached snapshot folder of ``ref``'s revision (huggingface_hub's cache layout: refs/<name> holds the
    commit, snapshots/<commit>/ the files), or None."""
    from huggingface_hub import constants  # local: huggingface_hub takes ~0.3 s to import

    storage = Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo_id.replace("/", "--"))
    revision = ref.revision or "main"
    commit = revision
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _is_network_failure(err: Exception) -> bool:
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in (
        "httpx", "httpx2", "requests", "urllib3", "httpcore")


def list_hub_files(ref: HubRef) -> tuple[list[str], str]:
    """(the repository's file paths at ``ref``'s revision, where they were listed: "hub" or "cache").

    Online, the Hub lists them; with ``HF_HUB_OFFLINE`` set, or when the Hub cannot be reached, the cached
    snapshot does (what an earlier download left). One CheckpointError line when neither can.
    """
    _, api, constants, errors = _hub()
    revision = ref.revision or "main"
    why = "HF_HUB_OFFLINE is set (offline mode: only the cache is read)"
    unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()  # seconds, not huggingface_hub's 24 s
    if unreachable is not None:
        why = f"the Hub could not be reached (no network? {unreachable})"
    elif not constants.HF_HUB_OFFLINE:
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)  # its retry warnings would break the one-line error of the CLI
        try:
            return sorted(api().list_repo_files(ref.repo_id, revision=ref.revision)), "hub"
        except errors.RepositoryNotFoundError:
            raise CheckpointError(ref.label, "repository not found on the Hugging Face Hub (or private/gated: log in "
                                             "with `hf auth login`)") from None
        except errors.RevisionNotFoundError:
            raise CheckpointError(ref.label, f"revision {revision!r} not found in the repository") from None
        except Exception as err:
            if not (_is_network_failure(err) or isinstance(err, errors.HfHubHTTPError)):
                raise
            why = f"the Hub could not be reached ({type(err).__name__})"
        finally:
            hub_logger.setLevel(level)
    snapshot = _cached_snapshot(ref)
    if snapshot is None:
        raise CheckpointError(ref.label, f"revision {revision} is not in the Hugging Face cache "
                                         f"{constants.HF_HUB_CACHE} and {why}: it needs a network once "
                                         "(`av2ts download NAME` on a machine with one fetches it)")
    files = sorted(str(p.relative_to(snapshot).as_posix()) for p in snapshot.rglob("*") if p.is_file())
    return files, "cache"


def pick_hub_file(files: list[str], entry: RegistryEntry, label: str) -> str:
    """The one ``.pth`` of ``entry``'s model folder among a repository's ``files``: under ``entry.hub_folder``, in a
    folder (or with a name) with a ``_``/``-``/``.``-separated word that starts with ``entry.hub_match`` and goes on
    with no digit, case-insensitive (R50: ``checkpoints/avs_s4/COMBO_R50_bs8_80k/model_best.pth``, not ``R500``;
    PVT: ``COMBO_PVTV2B5_bs8_80k``, ``COMBO_PVT_...``). A CheckpointError naming the candidates when none or
    several match."""
    prefix = entry.hub_folder.strip("/") + "/"
    word = re.compile(rf"(^|[_\-./]){re.escape(entry.hub_match)}(?![0-9])", re.IGNORECASE)
    under = [f for f in files if f.startswith(prefix) and f.lower().endswith(".pth")]
    # the model folder's path, or the file's own name for a file directly under hub_folder
    picked = [f for f in under if word.search(f[len(prefix):].rpartition("/")[0] or f[len(prefix):])]
    if len(picked) == 1:
        return picked[0]
    what = f"a .pth file in a {entry.hub_match} model folder under {prefix}"
    if not picked:
        seen = f"its .pth files there: {first_keys(under)}" if under else f"no .pth file under {prefix}"
        raise CheckpointError(label, f"no {what} ({seen})")
    raise CheckpointError(label, f"{len(picked)} candidates for {what} ({first_keys(picked)}); expected one")


def _content_sha256(path: Path) -> str:
    """sha256 of a downloaded file. The Hugging Face cache names each LFS blob by its sha256 (the file's ETag), so
    a snapshot link that resolves to such a name gives it without reading 0.6-1 GB again; anything else is hashed."""
    name = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        return name
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_folder(sha256: str, kind: str) -> Path:
    """Where the checkpoint converted from the upstream file of content hash ``sha256`` lives in av2ts's cache."""
    return cache_root() / CONVERTED_DIR / f"{kind}-{sha256[:32]}"


def _is_complete(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


@dataclasses.dataclass
class PreparedCheckpoint:
    """A registry model ready to load: the converted checkpoint folder, its upstream file, and, when this call
    converted it, the model itself (``(model, cfg, doc)``), so that the first use does not build it twice."""

    name: str
    folder: Path
    source_file: Path
    source_path: str  # the file's path inside the repository
    sha256: str
    converted: bool
    loaded: tuple | None = None


def prepare_registry_checkpoint(name: str) -> PreparedCheckpoint:
    """Download (if needed) and convert (once) the upstream file of a converted-on-use registry entry."""
    entry = REGISTRY[name]
    if not entry.converted_on_use:
        raise UsageError(f"{name}: not a registry model converted from an upstream file")
    ref = parse_hub_ref(entry.source)
    files, _ = list_hub_files(ref)
    picked = pick_hub_file(files, entry, f"{name} ({ref.label})")
    source = hub_download(HubRef(ref.repo_id, ref.revision, None), picked)
    sha256 = _content_sha256(source)
    folder = converted_folder(sha256, entry.convert_kind)
    prepared = PreparedCheckpoint(name, folder, source, picked, sha256, converted=False)
    if _is_complete(folder):
        return prepared
    from filelock import FileLock  # local: only a first use converts

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if _is_complete(folder):  # another process converted it while this one waited
            return prepared
        prepared.loaded = _convert(name, entry, source, picked, sha256, folder)
        prepared.converted = True
    return prepared


def _convert(name: str, entry: RegistryEntry, source: Path, picked: str, sha256: str, folder: Path) -> tuple:
    # local: the importer imports convert.py (rename tables, safe readers) and, when it runs, torch
    from av2ts_cli.convert_combo import convert_combo_kind

    if entry.convert_kind != "combo":
        raise UsageError(f"{name}: no converter on use for --kind {entry.convert_kind}")
    model, cfg, mapping, meta = convert_combo_kind(str(source), "combo")
    published = entry.published or {}
    meta["trained_on"] = {"subset": published.get("subset"), "by": "the COMBO authors (upstream training)",
                          "published": {k: v for k, v in published.items() if k != "subset"}}
    meta["registry"] = {"name": name, "source": f"{entry.source}/{picked}", "sha256": sha256,
                        "licence": entry.licence, "unused_source_entries": sorted(mapping.dropped)}
    save_checkpoint(model, cfg, folder, meta)  # files.atomic_folder: complete or absent
    return model, cfg, read_checkpoint_config(folder / CONFIG_FILE)


# ------------------------------------------------------------------------------------------------------- resolve
def resolve_checkpoint(name_or_path: str | os.PathLike) -> ResolvedCheckpoint:
    """The two files of a checkpoint (``checkpoints.resolve_checkpoint``), registry models converted on use
    included (prepared first)."""
    text = str(name_or_path)
    entry = REGISTRY.get(text)
    if entry is not None and entry.converted_on_use and not Path(text).expanduser().exists():
        folder = prepare_registry_checkpoint(text).folder
        return ResolvedCheckpoint(folder / WEIGHTS_FILE, folder / CONFIG_FILE, text)
    return resolve_checkpoint_files(text)


def load_checkpoint(name_or_path: str | os.PathLike):
    """``(model, cfg, config document)`` of any source ``resolve_checkpoint`` accepts, eval mode."""
    text = str(name_or_path)
    entry = REGISTRY.get(text)
    if entry is not None and entry.converted_on_use and not Path(text).expanduser().exists():
        prepared = prepare_registry_checkpoint(text)
        if prepared.loaded is not None:
            return prepared.loaded
        return load_checkpoint_files(prepared.folder)
    return load_checkpoint_files(text)


def resolve_model(name: str | os.PathLike, *, subset: str | None = None, presets: bool = False, device="cpu"):
    """THE one resolver of ``--model``: ``(model, cfg, config document)``, eval mode, on ``device``.

    With ``presets=True`` a preset name (``config.PRESET_NAMES``) that is not an existing path builds a randomly
    initialised network for ``subset`` (s4 when None); its document is what ``save_checkpoint`` would write. Any
    other name is a checkpoint: a folder or file, ``hf://owner/repo[@rev][/sub]`` or a ``REGISTRY`` name (those
    converted on use are downloaded and converted the first time). Anything else is a UsageError naming the
    accepted forms. With ``subset``, a checkpoint must fit it (``avsbench.subsets_compatible``) and ``cfg.subset``
    is set to it.
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
            raise UsageError(f"--model {text}: is a preset (an architecture), not a checkpoint; trained weights "
                             f"exist for the COMBO registry names only; pass {forms}")
        raise UsageError(f"--model {text}: no such file or folder, and not a checkpoint ({forms})")
    model, cfg, doc = load_checkpoint(text)
    if subset is not None:
        if not subsets_compatible(cfg.subset, subset):
            raise UsageError(f"{text} is a {cfg.subset} model; --subset is {subset}")
        cfg = dataclasses.replace(cfg, subset=subset)
    return model.to(device), cfg, doc


def check_finite_output(output, model, name: str, where: str = "") -> None:
    """A CheckpointError naming the model ``name`` when the semantic map ``output`` [B, T, K, S, S] (any shape)
    holds NaN or infinite values: such a map gives empty or arbitrary masks, never an answer. The message says
    whether the network's own tensors are the cause (and names the first of them) or its weights are finite (the
    computation overflowed: fp16, an input out of range). ``where``: what the window was (``" at t = 3.0 s"``).

    The test is the sum's: a NaN or infinity anywhere makes the sum NaN or infinite, and a semantic map's values
    lie in [0, 1], so a float32 sum of even an AVSS window cannot overflow by itself. Measured on the shared 2-core
    machine, one thread, a window of 5 x 71 x 224 x 224 floats (AVSS): 15 ms for ``sum``, 240 ms for
    ``isfinite(...).all()`` (a bool tensor of the whole map), 235 ms for a float64 sum; 0.02 ms for a 5 x 2 x 128
    x 128 window (av2ts-tiny); the forward pass that made the window takes seconds."""
    import torch  # local: torch takes seconds to import; this module is imported by `info` without a model

    if bool(torch.isfinite(output.sum())):
        return
    bad = [key for key, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        cause = f"{len(bad)} of its weight tensors hold NaN or infinite values ({first_keys(bad)}): a broken checkpoint"
    else:
        cause = "its weights are finite, so the computation overflowed (in fp16 or bf16, fp32 avoids that)"
    raise CheckpointError(name, f"the network's output is NaN or infinite{where}; {cause}")


def load_model(name_or_path: str | os.PathLike, device="cpu", allow_random_init: bool = False):
    """``(model, cfg)`` of ``resolve_model`` (``allow_random_init``: its ``presets``)."""
    model, cfg, _ = resolve_model(name_or_path, presets=allow_random_init, device=device)
    return model, cfg


# ------------------------------------------------------------------------------------------------ describe (info)
def describe_parameters(name_or_path: str, subset: str | None = None) -> dict:
    """Parameter counts per part (trainable and frozen; the parts of the network's family) of a preset (built for
    ``subset``, s4 if None, random init) or any checkpoint (``resolve_model``); for a registry name also its
    published scores and licence (``"registry"``)."""
    text = str(name_or_path)
    model, cfg, _ = resolve_model(text, subset=subset, presets=True)
    labels = parts_of_family(cfg.family)
    counts: dict[str, dict[str, int]] = {}
    for part in dict.fromkeys(labels.values()):
        counts[part] = {"parameters": 0, "trainable": 0, "frozen": 0}
    for key, param in model.named_parameters():
        entry = counts.setdefault(part_of(key, cfg.family), {"parameters": 0, "trainable": 0, "frozen": 0})
        entry["parameters"] += param.numel()
        entry["trainable" if param.requires_grad else "frozen"] += param.numel()
    parts = [{"part": part, **c} for part, c in counts.items() if c["parameters"] or part in labels.values()]
    total = {k: sum(p[k] for p in parts) for k in ("parameters", "trainable", "frozen")}
    report = {"name": text, "preset": cfg.preset, "family": cfg.family, "subset": cfg.subset,
              "num_classes": cfg.num_classes, "siam": cfg.siam, "parts": parts, "total": total}
    entry = REGISTRY.get(text)
    if entry is not None and not Path(text).expanduser().exists():
        report["registry"] = {"description": entry.description, "source": entry.source,
                              "published": entry.published, "licence": entry.licence}
    return report
