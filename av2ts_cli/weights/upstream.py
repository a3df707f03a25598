"""Registry models whose source is an upstream file: listed on the Hub, downloaded, converted once on first use.

A converted-on-use entry is resolved in four steps: list the files of its Hub repository (``hub.list_hub_files``;
offline, or with the Hub out of reach, the files of the cached snapshot), pick the one ``.pth`` of its model folder
(an error naming what was found when none or several match), ``hf_hub_download`` it into the Hugging Face cache,
and convert it once (``convert.py``) into av2ts's cache (``config.cache_root()/converted/``), keyed by the
downloaded file's content hash. The conversion runs under a file lock and is written with ``files.atomic_folder``:
two processes converting at once wait for one another and never see half a folder. A second use finds the converted
checkpoint and needs no network (``HF_HUB_OFFLINE=1`` works).

An entry whose upstream file is on Google Drive (``RegistryEntry.gdrive_id``: AVSegFormer's) takes the same path
with another first step: ``gdrive_file`` fetches the file once with gdown (``fetch_from_gdrive``, the one call of
it) into av2ts's cache (``config.cache_root()/downloads/gdrive/<file id>.pth``, a partial download resumed), checks
that it is a whole ``torch.save`` file, and records its sha256 beside it (``<file id>.pth.sha256``), so that a later
use reads neither the network nor the 0.3-0.7 GB again. Without a network it is one line naming the file id and
the manual route (``av2ts convert FILE --kind avsegformer --subset ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from pathlib import Path

from av2ts_cli.config import cache_root
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.files import atomic_open
from av2ts_cli.locks import held
from av2ts_cli.weights.checkpoint import CONFIG_FILE, WEIGHTS_FILE, first_keys, read_checkpoint_config, save_checkpoint
from av2ts_cli.weights.hub import HubRef, hub_download, hub_offline, list_hub_files, network_cause, parse_hub_ref
from av2ts_cli.weights.mapping import damage
from av2ts_cli.weights.registry import REGISTRY, RegistryEntry

CONVERTED_DIR = "converted"  # under config.cache_root()
DOWNLOADS_DIR = "downloads"  # under config.cache_root(): upstream files that no other cache keeps
GDRIVE_DIR = "gdrive"  # under DOWNLOADS_DIR: Google Drive files, <file id>.pth and <file id>.pth.sha256


def pick_hub_file(files: list[str], entry: RegistryEntry, label: str) -> str:
    """The one ``.pth`` of ``entry``'s model folder among a repository's ``files``: under ``entry.hub_folder``, in a
    folder (or with a name) with a ``_``/``-``/``.``-separated word that starts with ``entry.hub_match`` and goes on
    with no digit, case-insensitive (R50: ``checkpoints/avs_s4/COMBO_R50_bs8_80k/model_best.pth``, not ``R500``;
    PVT: ``COMBO_PVTV2B5_bs8_80k``, ``COMBO_PVT_...``). An empty ``hub_folder`` is the repository's root; with
    ``entry.hub_file`` only files of that name count (VCT: ``s4_swinb_384/model_best.pth``). A CheckpointError
    naming the candidates when none or several match."""
    folder = entry.hub_folder.strip("/")
    prefix = f"{folder}/" if folder else ""
    where = prefix or "the repository's root"
    word = re.compile(rf"(^|[_\-./]){re.escape(entry.hub_match)}(?![0-9])", re.IGNORECASE)
    under = [f for f in files if f.startswith(prefix) and f.lower().endswith(".pth")
             and (entry.hub_file is None or f.rpartition("/")[2] == entry.hub_file)]
    # the model folder's path, or the file's own name for a file directly under hub_folder
    picked = [f for f in under if word.search(f[len(prefix):].rpartition("/")[0] or f[len(prefix):])]
    if len(picked) == 1:
        return picked[0]
    named = entry.hub_file or ".pth file"
    what = f"a {named} in a {entry.hub_match} model folder under {where}"
    if not picked:
        files_named = f"files named {entry.hub_file}" if entry.hub_file else ".pth files"
        seen = f"its {files_named} there: {first_keys(under)}" if under else f"no {named} under {where}"
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
    source_path: str  # the file's path inside the repository (a Google Drive file: its name in the cache)
    sha256: str
    converted: bool
    loaded: tuple | None = None
    origin: str = ""  # where the upstream file came from: hf://owner/repo@revision/path, or its Google Drive page


def prepare_registry_checkpoint(name: str) -> PreparedCheckpoint:
    """Download (if needed) and convert (once) the upstream file of a converted-on-use registry entry."""
    entry = REGISTRY[name]
    if not entry.converted_on_use:
        raise UsageError(f"{name}: not a registry model converted from an upstream file")
    if entry.gdrive_id is not None:
        source, sha256 = gdrive_file(name, entry)
        picked, origin = source.name, entry.source
    else:
        ref = parse_hub_ref(entry.source)
        files, _ = list_hub_files(ref)
        picked = pick_hub_file(files, entry, f"{name} ({ref.label})")
        source = hub_download(HubRef(ref.repo_id, ref.revision, None), picked)
        sha256 = _content_sha256(source)
        origin = f"{entry.source}/{picked}"
    folder = converted_folder(sha256, entry.convert_kind)
    prepared = PreparedCheckpoint(name, folder, source, picked, sha256, converted=False, origin=origin)
    if _is_complete(folder):
        return prepared
    # one conversion at a time: a second process waits (up to an hour: a PVT checkpoint converts in about a minute)
    with held(folder.with_name(folder.name + ".lock"), wait=3600.0, remove_empty_folder=True):
        if _is_complete(folder):  # another process converted it while this one waited
            return prepared
        prepared.loaded = _convert(name, entry, source, origin, sha256, folder)
        prepared.converted = True
    return prepared


def _convert(name: str, entry: RegistryEntry, source: Path, origin: str, sha256: str, folder: Path) -> tuple:
    # local: the converters' rename tables and readers, and torch when they run; only a first use converts
    from av2ts_cli.weights.convert import convert

    model, cfg, mapping, meta = convert(str(source), entry.convert_kind, preset=entry.convert_preset,
                                        subset=entry.convert_subset)
    published = entry.published or {}
    meta["trained_on"] = {"subset": published.get("subset"), "by": f"the {entry.authors} (upstream training)",
                          "published": {k: v for k, v in published.items() if k != "subset"}}
    meta["registry"] = {"name": name, "source": origin, "sha256": sha256,
                        "licence": entry.licence, "unused_source_entries": sorted(mapping.dropped)}
    save_checkpoint(model, cfg, folder, meta)  # files.atomic_folder: complete or absent
    return model, cfg, read_checkpoint_config(folder / CONFIG_FILE)


# -------------------------------------------------------------------------------------------------- Google Drive
class DriveRefused(Exception):
    """Google Drive answered, but not with the file (a quota, permission or sign-in page): gdown's words."""


def fetch_from_gdrive(file_id: str, out: Path) -> None:
    """THE one call of gdown: Google Drive's file ``file_id`` into ``out`` (gdown writes ``<out>NNNNNNNN.part``
    beside it and resumes that after an interruption; tests stand in for this function). A network failure is an
    OSError (requests'), a refusal ``DriveRefused``."""
    import gdown  # local: gdown imports requests and BeautifulSoup; only a first use of a Drive entry needs it

    try:  # gdown's own progress bar on a terminal (stderr): a file is 0.3-0.7 GB
        gdown.download(id=file_id, output=str(out), quiet=not sys.stderr.isatty(), resume=True, timeout=60,
                       retries=2)
        return
    except gdown.exceptions.DownloadError as err:
        failure = err
    if isinstance(failure.__cause__, OSError):  # the network failed, again after gdown's retries
        raise ConnectionError(str(failure.__cause__)) from failure.__cause__
    raise DriveRefused(" ".join(str(failure).split()))


def _manual_route(entry: RegistryEntry) -> str:
    subset = f" --subset {entry.convert_subset}" if entry.convert_subset else ""
    return (f"download {entry.source} by hand and run: av2ts convert FILE --kind {entry.convert_kind}{subset} "
            "--out DIR, then pass --model DIR")


def gdrive_file(name: str, entry: RegistryEntry) -> tuple[Path, str]:
    """(path, sha256) of the Google Drive file of ``entry`` in av2ts's cache, fetched the first time (under a lock:
    a second process waits) and checked; offline (``HF_HUB_OFFLINE``) or without a network, a CheckpointError
    naming the file id and the manual route."""
    folder = cache_root() / DOWNLOADS_DIR / GDRIVE_DIR
    path = folder / f"{entry.gdrive_id}.pth"
    record = path.with_name(path.name + ".sha256")  # written last: the file is whole and checked
    if path.is_file() and record.is_file():
        return path, record.read_text().strip()
    what = f"Google Drive file {entry.gdrive_id}"
    if hub_offline() and not path.is_file():
        raise CheckpointError(name, f"{what} is not in av2ts's cache ({folder}) and HF_HUB_OFFLINE is set (offline "
                                    f"mode: it needs a network once); or {_manual_route(entry)}")
    folder.mkdir(parents=True, exist_ok=True)
    with held(folder / f"{entry.gdrive_id}.lock", wait=3600.0, label=f"{name} ({what})", remove_empty_folder=True):
        if not path.is_file():  # else another process fetched it while this one waited
            partial = path.with_name(path.name + ".download")
            try:
                fetch_from_gdrive(entry.gdrive_id, partial)
            except OSError as err:
                raise CheckpointError(name, f"could not download {what} ({network_cause(err)}); without a network, "
                                            f"{_manual_route(entry)}") from None
            except DriveRefused as err:
                raise CheckpointError(name, f"Google Drive did not give {what} ({err}); {_manual_route(entry)}") \
                    from None
            broken = damage(partial) if partial.is_file() else "gdown wrote no file"
            if broken:
                partial.unlink(missing_ok=True)
                raise CheckpointError(name, f"the download of {what} is not a checkpoint ({broken}); "
                                            f"{_manual_route(entry)}")
            partial.replace(path)
        sha256 = _content_sha256(path)
        with atomic_open(record, "w") as f:
            f.write(sha256 + "\n")
    return path, sha256
