"""``av2ts models``: every name of the registry with what a user weighs before fetching it (family, backbone,
subset, the published J and F with the protocol they were measured under, parameters, licence) and whether it is
in the caches here already (and where). Nothing is downloaded: the caches are only looked at."""

from __future__ import annotations

import json
import re
from pathlib import Path

from av2ts_cli import __version__
from av2ts_cli.config import cache_root, get_preset
from av2ts_cli.files import write_json
from av2ts_cli.weights.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from av2ts_cli.weights.hub import HF_PREFIX, _cached_snapshot, parse_hub_ref
from av2ts_cli.weights.registry import REGISTRY, RegistryEntry
from av2ts_cli.weights.upstream import DOWNLOADS_DIR, GDRIVE_DIR, converted_folder, pick_hub_file

PARAMETERS_FILE = "parameters.json"  # under config.cache_root(): counts of the presets, per av2ts version
_BACKBONES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "pvt_v2_b5": "PVT-v2-b5",
              "swin_base_patch4_window12_384": "Swin-B-384"}


def list_models() -> list[dict]:
    """One record per registry name: name, description, family, preset, backbone, subset, published (J, F,
    protocol), parameters, size_bytes (of the upstream file, when it is here), licence, source, cached, where."""
    counts = _parameter_counts()
    return [_record(name, entry, counts) for name, entry in REGISTRY.items()]


def _architecture(entry: RegistryEntry) -> dict:
    """{"preset", "subset"} of an entry: its conversion's, or a ready local checkpoint's config (None: unknown)."""
    preset, subset = entry.convert_preset, entry.convert_subset or (entry.published or {}).get("subset")
    if preset is None and entry.source and (Path(entry.source) / CONFIG_FILE).is_file():
        try:
            model = json.loads((Path(entry.source) / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
            preset, subset = model["preset"], model["subset"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return {"preset": preset, "subset": subset or ("s4" if preset else None)}


def _record(name: str, entry: RegistryEntry, counts: dict) -> dict:
    preset, subset = _architecture(entry).values()
    cfg = get_preset(preset, subset) if preset else None
    where, size = cache_state(entry)
    published = None
    if entry.published:
        published = {"J": entry.published.get("J"), "F": entry.published.get("F"),
                     "protocol": entry.published.get("protocol", "av2ts")}
    return {"name": name, "description": entry.description, "family": cfg.family if cfg else None,
            "preset": preset, "backbone": _BACKBONES.get(cfg.backbone, cfg.backbone) if cfg else None,
            "subset": subset, "published": published,
            "parameters": counts.get(f"{preset}/{subset}") if preset else None, "size_bytes": size,
            "licence": entry.licence, "source": entry.source, "cached": where is not None,
            "where": str(where) if where else None}


def cache_state(entry: RegistryEntry) -> tuple[Path | None, int | None]:
    """(where the model is ready in the caches here, the upstream file's size when it is here), looked up on disk
    only: a converted checkpoint for the entries converted on use, the snapshot for a Hub repository, the folder for
    a local one."""
    if entry.source is None:
        return None, None
    if entry.gdrive_id is not None:
        file = cache_root() / DOWNLOADS_DIR / GDRIVE_DIR / f"{entry.gdrive_id}.pth"
        record = file.with_name(file.name + ".sha256")
        if not (file.is_file() and record.is_file()):
            return None, None
        return _converted(record.read_text().strip(), entry.convert_kind), file.stat().st_size
    if entry.source.startswith(HF_PREFIX):
        snapshot = _cached_snapshot(parse_hub_ref(entry.source))
        if snapshot is None:
            return None, None
        if not entry.converted_on_use:
            return snapshot, None
        files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
        try:
            picked = snapshot / pick_hub_file(files, entry, entry.source)
        except Exception:  # not downloaded yet (or the cache holds several candidates): not ready here
            return None, None
        blob = picked.resolve().name
        sha256 = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None
        return (_converted(sha256, entry.convert_kind) if sha256 else None), picked.stat().st_size
    folder = Path(entry.source)
    return (folder if (folder / WEIGHTS_FILE).is_file() else None), None


def _converted(sha256: str, kind: str) -> Path | None:
    folder = converted_folder(sha256, kind)
    return folder if (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file() else None


def _parameter_counts() -> dict[str, int]:
    """{"preset/subset": parameters built here} of every registry entry's architecture, counted once per av2ts
    version on the meta device (no memory, no init) and cached: a listing must not build seven networks each time."""
    wanted = sorted({f"{record['preset']}/{record['subset']}" for record in (
        _architecture(entry) for entry in REGISTRY.values()) if record["preset"]})
    path = cache_root() / PARAMETERS_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("version") == __version__ and set(wanted) <= set(cached.get("counts", {})):
            return cached["counts"]
    except (OSError, ValueError, AttributeError):
        pass
    import torch  # local: torch and the network, only to count what is not cached yet

    from av2ts_cli.model import build_model  # local: as above

    counts = {}
    for key in wanted:
        preset, subset = key.split("/")
        with torch.device("meta"):
            counts[key] = sum(p.numel() for p in build_model(get_preset(preset, subset)).parameters())
    try:
        write_json(path, {"version": __version__, "counts": counts})
    except OSError:  # an unwritable cache costs a count next time, nothing else
        pass
    return counts


def print_models(models: list[dict]) -> None:
    """The listing as a table on the console (``av2ts models``)."""
    from rich.table import Table  # local: only the table needs it

    from av2ts_cli.console import console, info  # local: as above

    table = Table(title="av2ts models (av2ts download NAME fetches one ahead; --model NAME uses it)",
                  title_justify="left")
    for column, justify in (("name", "left"), ("family", "left"), ("backbone", "left"), ("subset", "left"),
                            ("J / F (%)", "right"), ("protocol", "left"), ("parameters", "right"),
                            ("licence", "left"), ("here", "left")):
        table.add_column(column, justify=justify, no_wrap=column == "name")
    for model in models:
        published = model["published"] or {}
        scores = f"{published['J']} / {published['F']}" if published else "-"
        table.add_row(model["name"], model["family"] or "-", model["backbone"] or "-", model["subset"] or "-",
                      scores, published.get("protocol", "-"),
                      f"{model['parameters'] / 1e6:.1f} M" if model["parameters"] else "-",
                      model["licence"] or "-", "cached" if model["cached"] else "-")
    console.print(table)
    info("Published numbers are the authors' own, under the protocol named (docs/data-and-metrics.md, 'Protocols').")
