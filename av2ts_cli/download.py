"""``av2ts download NAME...``: fetch models into the caches ahead of use, for an offline machine or a cluster node.

What each name fetches, and where:

- a registry model converted on use (``combo-r50-s4``, ``combo-pvt-s4``): its upstream ``.pth`` into the Hugging
  Face cache, then the converted av2ts checkpoint into av2ts's cache (``weights.prepare_registry_checkpoint``);
  afterwards ``--model NAME`` works with ``HF_HUB_OFFLINE=1``;
- an AVSegFormer model (``avsegformer-{pvt,r50}-{s4,ms3,avss}``): its authors' file from Google Drive (gdown) into
  ``config.cache_root()/downloads/gdrive/``, then converted as above (``weights.upstream.gdrive_file``);
- ``ced-mini``: CED-Mini's weights (``hf://mispeech/ced-mini``) into the Hugging Face cache, what
  ``av2ts convert ced-mini --kind ced-hf`` reads;
- ``vggish``: the released VGGish weights (``vggish-10086976.pth``, harritaylor/torchvggish v0.1 on GitHub, not on
  the Hub) into ``config.cache_root()/downloads/``, checked against the sha256 prefix in its name; what
  ``av2ts convert FILE --kind vggish`` imports;
- ``sam-vit-base``: the default maskige generator (``maskiges.generate.DEFAULT_GENERATOR``, pinned) into the
  Hugging Face cache, what ``av2ts maskiges`` runs.

Offline (``HF_HUB_OFFLINE=1``) a name that is cached already is reported as it is; a missing one is one error line
naming the repository (or URL, or Google Drive file id) and saying that it needs a network.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from av2ts_cli.config import cache_root
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.files import atomic_path
from av2ts_cli.maskiges.generate import DEFAULT_GENERATOR, resolve_generator
from av2ts_cli.weights.checkpoint import WEIGHTS_FILE
from av2ts_cli.weights.hub import hub_download, hub_offline, parse_hub_ref
from av2ts_cli.weights.registry import REGISTRY
from av2ts_cli.weights.upstream import DOWNLOADS_DIR, prepare_registry_checkpoint

VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
VGGISH_FILE = "vggish-10086976.pth"  # torch.hub's convention: the name carries the first 8 hex digits of the sha256
VGGISH_SHA256_PREFIX = "10086976"
EXTRA_NAMES = ("vggish", "sam-vit-base")


def known_names() -> list[str]:
    """Every name ``av2ts download`` accepts: the registry's downloadable models and the extras."""
    registry = [name for name, entry in REGISTRY.items()
                if entry.converted_on_use or (entry.source and entry.source.startswith("hf://"))]
    return registry + list(EXTRA_NAMES)


def vggish_path() -> Path:
    """Where ``av2ts download vggish`` keeps the released VGGish weights."""
    return cache_root() / DOWNLOADS_DIR / VGGISH_FILE


def fetch_vggish(timeout: float = 60.0) -> dict:
    """The VGGish release in av2ts's cache (downloaded once, atomically, its sha256 prefix checked)."""
    path = vggish_path()
    if path.is_file():
        return {"name": "vggish", "fetched": False, "path": str(path), "source": VGGISH_URL,
                "use": f"av2ts convert {path} --kind vggish --out DIR"}
    if hub_offline():
        raise CheckpointError(VGGISH_URL, f"{VGGISH_FILE} is not in av2ts's cache ({path.parent}) and "
                                          "HF_HUB_OFFLINE is set: it needs a network once")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(VGGISH_URL, timeout=timeout) as response, atomic_path(path) as temp:
            with open(temp, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if not digest.hexdigest().startswith(VGGISH_SHA256_PREFIX):
                raise CheckpointError(VGGISH_URL, f"the download's sha256 {digest.hexdigest()[:16]}... does not start "
                                                  f"with {VGGISH_SHA256_PREFIX}: not the released file (not kept)")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise CheckpointError(VGGISH_URL, f"could not download {VGGISH_FILE} ({reason}): it needs a network") from None
    return {"name": "vggish", "fetched": True, "path": str(path), "source": VGGISH_URL,
            "use": f"av2ts convert {path} --kind vggish --out DIR"}


def fetch_ced_mini() -> dict:
    entry = REGISTRY["ced-mini"]
    path = hub_download(parse_hub_ref(entry.source), WEIGHTS_FILE)
    return {"name": "ced-mini", "fetched": True, "path": str(path), "source": entry.source,
            "use": f"av2ts convert ced-mini --kind {entry.convert_kind} --base CHECKPOINT --out DIR"}


def fetch_generator() -> dict:
    resolved = resolve_generator(DEFAULT_GENERATOR)
    return {"name": "sam-vit-base", "fetched": True, "path": str(resolved.folder), "source": DEFAULT_GENERATOR,
            "use": "av2ts maskiges (the default --generator)"}


def fetch_registry_model(name: str) -> dict:
    prepared = prepare_registry_checkpoint(name)
    return {"name": name, "fetched": True, "converted": prepared.converted, "path": str(prepared.folder),
            "source": prepared.origin, "source_file": str(prepared.source_file),
            "sha256": prepared.sha256, "use": f"--model {name}"}


def download(names: list[str], on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Fetch every name (``known_names``) in order; ``on_done`` sees each result as it is ready. The first
    failure is raised (one line); what was fetched before it stays in the caches."""
    known = known_names()
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        what = f"unknown name(s) {', '.join(unknown)}" if unknown else "no name given"
        raise UsageError(f"{what}; av2ts download fetches {', '.join(known)} (`av2ts models` describes them)")
    results = []
    for name in dict.fromkeys(names):
        if name == "vggish":
            result = fetch_vggish()
        elif name == "sam-vit-base":
            result = fetch_generator()
        elif name == "ced-mini":
            result = fetch_ced_mini()
        elif REGISTRY[name].converted_on_use:
            result = fetch_registry_model(name)
        else:  # a ready av2ts checkpoint on the Hub
            ref = parse_hub_ref(REGISTRY[name].source)
            files = [hub_download(ref, f) for f in ("config.json", WEIGHTS_FILE)]
            result = {"name": name, "fetched": True, "path": str(files[0].parent), "source": ref.label,
                      "use": f"--model {name}"}
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def describe(result: dict) -> str:
    """One line for a fetched name: what, where, how to use it."""
    if result["name"] == "vggish" and not result["fetched"]:
        state = "already in the cache"
    elif "converted" in result:
        state = "converted now" if result["converted"] else "converted earlier"
    else:
        state = "in the cache"
    return f"{result['name']}: {state}: {result['path']} (from {result['source']}; use: {result['use']})"
