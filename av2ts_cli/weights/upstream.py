"""Registry models whose source is an upstream file: listed on the Hub, downloaded, converted once on first use.

A converted-on-use entry is resolved in four steps: list the files of its Hub repository (``hub.list_hub_files``;
offline, or with the Hub out of reach, the files of the cached snapshot), pick the one ``.pth`` of its model folder
(an error naming what was found when none or several match), ``hf_hub_download`` it into the Hugging Face cache,
and convert it once (``convert.py``) into av2ts's cache (``config.cache_root()/converted/``), keyed by the
downloaded file's content hash. The conversion runs under a file lock and is written with ``files.atomic_folder``:
two processes converting at once wait for one another and never see half a folder. A second use finds the converted
checkpoint and needs no network (``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from av2ts_cli.config import cache_root
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.locks import held
from av2ts_cli.weights.checkpoint import CONFIG_FILE, WEIGHTS_FILE, first_keys, read_checkpoint_config, save_checkpoint
from av2ts_cli.weights.hub import HubRef, hub_download, list_hub_files, parse_hub_ref
from av2ts_cli.weights.registry import REGISTRY, RegistryEntry

CONVERTED_DIR = "converted"  # under config.cache_root()


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
    # one conversion at a time: a second process waits (up to an hour: a PVT checkpoint converts in about a minute)
    with held(folder.with_name(folder.name + ".lock"), wait=3600.0, remove_empty_folder=True):
        if _is_complete(folder):  # another process converted it while this one waited
            return prepared
        prepared.loaded = _convert(name, entry, source, picked, sha256, folder)
        prepared.converted = True
    return prepared


def _convert(name: str, entry: RegistryEntry, source: Path, picked: str, sha256: str, folder: Path) -> tuple:
    # local: the converters' rename tables and readers, and torch when they run; only a first use converts
    from av2ts_cli.weights.convert import convert

    model, cfg, mapping, meta = convert(str(source), entry.convert_kind)
    published = entry.published or {}
    meta["trained_on"] = {"subset": published.get("subset"), "by": f"the {entry.authors} (upstream training)",
                          "published": {k: v for k, v in published.items() if k != "subset"}}
    meta["registry"] = {"name": name, "source": f"{entry.source}/{picked}", "sha256": sha256,
                        "licence": entry.licence, "unused_source_entries": sorted(mapping.dropped)}
    save_checkpoint(model, cfg, folder, meta)  # files.atomic_folder: complete or absent
    return model, cfg, read_checkpoint_config(folder / CONFIG_FILE)
