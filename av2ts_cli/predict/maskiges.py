"""Maskiges for ``av2ts predict`` with a Siam model: ``--maskiges auto`` (the default) or ``--maskiges DIR``.

auto: the maskiges of exactly the sampled frames are made on the fly by ``maskiges.video.video_maskiges`` (the
function behind ``av2ts maskiges clip.mp4 --out DIR``) into the video's own output folder,
``OUT/<video>/maskiges/fps<F>/NNNNNN.png`` with its ``maskiges.json``. They outlive the run: a re-run, an overlay
redo or ``--force`` reuses them, and a change of ``--fps`` makes its own set beside the others (switching back
reuses the first). The generator (``LazyGenerator``) loads its SAM weights only when a frame is missing, so a run
whose maskiges are all cached loads no SAM model, and a model without the Siam encoder never builds one.

DIR: ``DIR/<video>/NNNNNN.png`` (or ``DIR/NNNNNN.png``), numbered like the masks, as ``av2ts maskiges --out DIR``
writes them. Either way the summary records what made the maskiges, and ``maskige_warning`` compares that with
what the checkpoint's ``config.json`` says the model trained on (``trained_on.maskiges``, written by ``train``).
"""

from __future__ import annotations

import json
from pathlib import Path

from av2ts_cli.errors import UsageError
from av2ts_cli.maskiges.generate import DEFAULT_GENERATOR, GeneratorSettings, resolve_generator
from av2ts_cli.maskiges.render import DEFAULT_GEOMETRY, GEOMETRIES
from av2ts_cli.maskiges.video import video_maskiges
from av2ts_cli.processes import resolve_device, resolve_precision
from av2ts_cli.runs import MASKIGES_RECORD

AUTO = "auto"
MASKIGES_DIR = "maskiges"  # OUT/<video>/maskiges/fps<F>/: the cache of --maskiges auto
# what decides whether two sets of maskiges are alike (the generator's commit when it came from the hub)
_HUB_IDENTITY = ("repo", "revision", "model_type", "settings")
_FOLDER_IDENTITY = ("generator", "model_type", "settings")


def parse_maskiges(value: str | Path | None) -> str | Path | None:
    """``--maskiges``: None or "auto" -> AUTO; anything else is a folder (``./auto`` names a folder called auto)."""
    if value is None or str(value) == AUTO:
        return AUTO
    return Path(value)


def auto_settings(spec: str | None, settings: dict | None) -> dict:
    """What ``--maskiges auto`` makes its maskiges with (a video's settings in ``summary.json``); UsageError for
    settings out of range."""
    return {"mode": AUTO, "generator": spec or DEFAULT_GENERATOR,
            "settings": GeneratorSettings(**(settings or {})).to_dict()}


class LazyGenerator:
    """A ``MaskGenerator`` that loads its model on the first ``generate``; ``describe`` needs only the model's
    config.json (hub references resolve through the local cache), so checking a cache loads no weights."""

    def __init__(self, spec: str | None, settings: dict | None, device: str):
        self.spec = spec or DEFAULT_GENERATOR
        self.settings = GeneratorSettings(**(settings or {}))
        self.device = device
        self.loaded = None  # the MaskGenerator once loaded
        self._description: dict | None = None

    def describe(self) -> dict:
        """As ``MaskGenerator.describe``: generator, repo, revision, model_type, precision (the one ``auto`` picks
        on this device), settings."""
        if self._description is None:
            resolved = resolve_generator(self.spec)
            try:
                model_type = json.loads((resolved.folder / "config.json").read_text(encoding="utf-8")).get(
                    "model_type")
            except (OSError, ValueError):
                model_type = None  # loading names the problem, with the file, if a frame is ever needed
            precision, _ = resolve_precision(None, resolve_device(self.device))  # the cached measurement
            self._description = {"generator": resolved.source, "repo": resolved.repo, "revision": resolved.revision,
                                 "model_type": model_type, "precision": precision,
                                 "settings": self.settings.to_dict()}
        return self._description

    def generate(self, image):
        """uint8 [H, W, 3] RGB -> bool (N, H, W) masks (``MaskGenerator.generate``)."""
        return self._load().generate(image)

    def generate_many(self, images):
        """Frames -> each one's masks, the encoder on them as one batch (``MaskGenerator.generate_many``)."""
        return self._load().generate_many(images)

    @property
    def frames_per_batch(self) -> int:
        """``MaskGenerator.frames_per_batch`` (asked only when frames are to be made: it loads the model)."""
        return self._load().frames_per_batch

    def _load(self):
        if self.loaded is None:
            # local: transformers and the SAM weights (seconds); only a frame without a cached maskige needs them
            from av2ts_cli.maskiges.generate import MaskGenerator

            self.loaded = MaskGenerator(self.spec, self.settings, self.device)
        return self.loaded


def auto_folder(video_folder: Path, fps: int) -> Path:
    return video_folder / MASKIGES_DIR / f"fps{fps}"


def make_auto(video: Path, video_folder: Path, generator: LazyGenerator, fps: int, progress=None,
              task=None, info=None, geometry: str = DEFAULT_GEOMETRY) -> tuple[Path, dict]:
    """The cached maskiges of ``video``'s sampled frames (made where missing): (folder, the summary's record).
    ``info``: predict's ``media.Probe`` of the video (it is probed once per video); ``geometry``: the model's
    (``render.geometry_for``)."""
    folder = auto_folder(video_folder, fps)

    def started(count: int) -> None:
        if progress is not None and count:
            progress.update(task, total=count, completed=0, description=f"maskiges · {video.name}")

    result = video_maskiges(video, folder, generator, fps=fps, on_start=started,
                            on_frame=(lambda: progress.advance(task)) if progress is not None else None, info=info,
                            geometry=geometry)
    return folder, {"mode": AUTO, "folder": str(folder), **generator.describe(),
                    "geometry": GEOMETRIES[geometry].describe(), "written": result["written"],
                    "reused": result["skipped"]}


def folder_of(option: Path, video_name: str, video: Path, times: list[float]) -> tuple[Path, dict]:
    """``--maskiges DIR``: DIR/<video> if it exists, else DIR; the record says what made them when
    ``av2ts maskiges`` wrote its ``maskiges.json`` there (else the generator is unknown). Maskiges made for another
    video, or for other sampling times (another ``--fps``), are a UsageError naming both: they would pair the
    frames with the wrong pictures."""
    if not option.is_dir():
        raise UsageError(f"--maskiges {option}: no such folder (or pass --maskiges auto)")
    own = option / video_name
    folder = own if own.is_dir() else option
    record = {"mode": "folder", "folder": str(folder)}
    try:
        made = json.loads((folder / MASKIGES_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record["generator"] = None
        return folder, record
    record.update({k: made.get(k) for k in ("generator", "repo", "revision", "model_type", "settings", "geometry")})
    if made.get("input") and Path(made["input"]) != video.resolve():
        raise UsageError(f"--maskiges {folder}: made for {made['input']}, not for {video} "
                         f"({MASKIGES_RECORD} there says so); give the folder of this video's maskiges")
    made_times = [round(float(t), 4) for t in made.get("times") or []]
    wanted = [round(t, 4) for t in times]
    if made_times and made_times[:len(wanted)] != wanted:
        raise UsageError(f"--maskiges {folder}: made for {len(made_times)} frames at --fps {made.get('fps')}, but "
                         f"{video} is sampled at {len(wanted)} other times (this run's --fps); make them with the "
                         "same --fps")
    return folder, record


def _identity(record: dict) -> dict:
    keys = _HUB_IDENTITY if record.get("repo") else _FOLDER_IDENTITY
    identity = {k: record.get(k) for k in keys}
    # points per batch trades speed for memory and leaves the masks as they are
    identity["settings"] = {k: v for k, v in (identity["settings"] or {}).items() if k != "points_per_batch"}
    return identity


def _label(record: dict) -> str:
    name = record.get("repo") or record.get("generator")
    revision = f"@{record['revision'][:12]}" if record.get("revision") else ""
    points = (record.get("settings") or {}).get("points_per_side")
    return f"{name}{revision}" + (f" ({points} points per side)" if points else "")


def maskige_warning(trained_on, used: dict, family: str = "combo") -> str | None:
    """A warning when the maskiges of this run (``used``: the summary's record) may not be the kind the model
    trained on (``trained_on``: config.json's, with ``maskiges`` from ``train``); None when they match or when
    this run's generator is unknown. ``family``: the model's (only COMBO's checkpoints are known to have trained on
    Semantic-SAM maskiges). A Siam encoder learns the look of its training maskiges: masks from another
    generator (SAM instead of COMBO's Semantic-SAM, other settings) cut regions differently."""
    if not used.get("generator"):
        return None
    trained = trained_on.get("maskiges") if isinstance(trained_on, dict) else None
    if not trained or trained.get("source") in (None, "unknown"):
        by_combo = isinstance(trained_on, dict) and "COMBO" in str(trained_on.get("by", ""))
        known = " (COMBO's checkpoints trained on Semantic-SAM maskiges)" if by_combo or family == "combo" else ""
        return (f"maskiges by {_label(used)}; the model's training maskiges are not recorded{known}, so they may "
                "differ from these")
    if trained.get("source") == "masks-from":
        return (f"maskiges by {_label(used)}; the model trained on maskiges made from the masks in "
                f"{trained.get('masks_from')}, generator unknown")
    if _identity(trained) != _identity(used):
        return f"maskiges by {_label(used)}; the model trained on maskiges by {_label(trained)}"
    return None


def geometry_warning(used: dict, geometry: str) -> str | None:
    """A warning when the maskiges of this run (``used``: the summary's record) were made in another geometry than
    the model's (``render.geometry_for``); None when they match or the record does not say."""
    made = (used.get("geometry") or {}).get("name")
    if made is None or made == geometry:
        return None
    return (f"maskiges made in the {made} geometry ({GEOMETRIES[made].describe()['generator_input']}); the model "
            f"trained on {geometry} maskiges ({GEOMETRIES[geometry].describe()['generator_input']})"
            if made in GEOMETRIES else f"maskiges made in an unknown geometry {made!r}; the model's is {geometry}")
