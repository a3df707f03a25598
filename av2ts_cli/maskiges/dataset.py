"""``av2ts maskiges --subset ... --data ROOT``: the ``pre_SAM_mask/`` maskiges of an AVSBench-layout dataset.

Every frame's maskige goes exactly where ``av2ts_cli.data.layout`` (and so ``train`` and ``eval``) reads it:
``s4_data/pre_SAM_mask/<split>/<category>/<video>/<frame>_mask_color.png``, ``ms3_data/pre_SAM_mask/<video>/...``,
``AVSBench_semantic/pre_SAM_mask/AVSBench_semantic/<label>/<uid>/processed_frames/<i>_mask_color.png``. The masks
come from ``--masks-from DIR`` (``sources``) or from a SAM-family generator (``generate``). With ``--geometry
source-384`` they are VCT's kind (the frame's id map resized to 384 x 384 nearest, every subset alike) and go to
VCT's 384 layout (``layout.maskiges_384``: ``s4_data_384/pre_SAM_mask_384/...``, ``ms3_data_384/...``,
``.../<label>/<uid>/processed_frames_384/``), recorded in ``pre_SAM_mask_384.json``; the generator sees the frames
as the standard layout stores them, as for COMBO's kind.

Resumable: a frame whose maskige exists is skipped (each file is written atomically, so an existing one is
whole). ``pre_SAM_mask.json`` beside ``pre_SAM_mask/`` records what made the maskiges (generator, revision,
settings, or the masks folder); a run with another source refuses to mix its maskiges with those unless
``--force`` (which remakes every frame), and so does a run that finds maskiges but no record (COMBO's published
ones, ``av2ts data synth``'s). Under torchrun each process takes the frames ``rank::world_size`` of the one frame
list (split, CSV and frame order), so every frame is written by exactly one process; rank 0 writes the record and
shows the progress. A frame whose masks or picture cannot be read is reported (one line naming the file) and the
others go on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from av2ts_cli import __version__, files
from av2ts_cli.console import make_progress
from av2ts_cli.data.images import image_header, read_rgb
from av2ts_cli.data.layout import (
    DATA_384,
    FORM_384,
    FORM_STANDARD,
    SPLITS,
    Video,
    list_videos,
    maskige_root,
    maskiges_384,
    read_metadata,
    resolve_root,
)
from av2ts_cli.errors import DataError, UsageError
from av2ts_cli.maskiges.generate import DEFAULT_GENERATOR, GeneratorSettings, MaskGenerator, resolve_generator
from av2ts_cli.maskiges.render import GEOMETRIES, MAX_ID, geometry_for, write_maskige
from av2ts_cli.maskiges.sources import MaskSource
from av2ts_cli.processes import device_for, environment

PROVENANCE_FILE = "pre_SAM_mask.json"
PROVENANCE_384 = "pre_SAM_mask_384.json"  # VCT's 384 maskiges (layout.FORM_384): beside their folder
VCT_GEOMETRY = "source-384"  # the geometry whose maskiges go to the 384 layout (render.geometry_for("vct", ...))
RECORD_WAIT_S = 600.0  # how long processes other than rank 0 wait for its record (rank 0 may resolve the model)
# how the masks become a picture, as the provenance record states it: COMBO's painting, at COMBO's or VCT's size
_PAINTING = (f"COMBO mask_precess: ascending area rank (stable for ties), smaller mask wins, ADE20K palette, ids "
             f"capped at {MAX_ID}")
RENDERER = f"{_PAINTING}; S4/MS3 224x224 nearest, AVSS fitted to 224x224 (train: short side + centre crop)"
RENDERER_384 = f"{_PAINTING}; VCT's generate_data_384: the frame's id map resized to 384x384 nearest"


@dataclass(frozen=True)
class FrameJob:
    video: Video  # in the standard layout: the generator sees its frames as stored (their source size)
    index: int
    target: Path  # where the maskige goes


def provenance_path(root: Path, subset: str, form: str = FORM_STANDARD) -> Path:
    """The provenance record of a subset folder's maskiges of one layout: ``pre_SAM_mask.json`` beside
    ``pre_SAM_mask/``, ``pre_SAM_mask_384.json`` beside the 384 ones (the AVSS folder's for AVSS)."""
    if form == FORM_384:
        return (root if subset == "avss" else root / DATA_384[subset]) / PROVENANCE_384
    return maskige_root(root, subset).parent / PROVENANCE_FILE


def frame_jobs(root: Path, subset: str, splits: tuple[str, ...] = SPLITS, form: str = FORM_STANDARD
               ) -> list[FrameJob]:
    """Every frame of the splits the metadata has, in split, CSV and frame order (the order shards are cut from),
    with its maskige's place in the ``form`` layout."""
    present = {split for _, split, _ in read_metadata(root, subset)}
    jobs = []
    for split in splits:
        if split not in present:
            continue
        for video in list_videos(root, subset, split):
            targets = maskiges_384(root, video) if form == FORM_384 else video.maskiges
            jobs += [FrameJob(video, i, targets[i]) for i in range(video.num_frames)]
    return jobs


def _identity(record: dict) -> dict:
    """The part of a provenance record that says whether two runs make the same maskiges."""
    if record.get("source") == "masks-from":
        return {"source": "masks-from", "masks_from": record.get("masks_from")}
    keys = ("repo", "revision", "model_type", "settings") if record.get("repo") else \
        ("generator", "model_type", "settings")
    return {"source": record.get("source"), **{k: record.get(k) for k in keys}}


def _read_record(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable provenance record: {err}") from None


class _Masks:
    """Where a frame's masks come from: the ``--masks-from`` files, or the generator (loaded on first use, so a
    run that finds every frame done loads nothing)."""

    def __init__(self, subset: str, masks_from, generator, settings, device: str):
        self.source = MaskSource(masks_from, subset) if masks_from is not None else None
        self.spec, self.settings, self.device = generator, settings, device
        self._generator = None

    def record(self) -> dict:
        if self.source is not None:
            return {"source": "masks-from", "masks_from": str(self.source.folder.resolve()), "generator": None}
        if self.spec is not None and not isinstance(self.spec, (str, os.PathLike)):
            return {"source": "generator", **self.spec.describe()}  # an already loaded MaskGenerator
        resolved = resolve_generator(self.spec or DEFAULT_GENERATOR)
        config = _read_json(resolved.folder / "config.json")
        return {"source": "generator", "generator": resolved.source, "repo": resolved.repo,
                "revision": resolved.revision, "model_type": config.get("model_type"),
                "settings": (self.settings or GeneratorSettings()).to_dict()}

    def generator(self):
        if self._generator is None:
            self._generator = self.spec if isinstance(self.spec, MaskGenerator) else \
                MaskGenerator(self.spec, self.settings, self.device)
        return self._generator

    def frames_per_batch(self) -> int:
        """Frames handled at once: the generator's encoder batch (``MaskGenerator.frames_per_batch``; asked only
        when there are frames to make, as it loads the model), one for ``--masks-from`` files."""
        return 1 if self.source is not None else self.generator().frames_per_batch

    def many(self, jobs: list[FrameJob]) -> list:
        """Each job's masks (bool [N, H, W]), or the ``DataError`` of its unreadable frame or mask file, in order;
        the generator sees the readable frames as one batch."""
        results: list = []
        for job in jobs:
            try:
                results.append(self.source.load(job.video, job.index, image_header(job.video.frames[job.index]))
                               if self.source is not None else read_rgb(job.video.frames[job.index]))
            except DataError as err:
                results.append(err)
        if self.source is None:
            frames = [i for i, result in enumerate(results) if not isinstance(result, DataError)]
            for i, masks in zip(frames, self.generator().generate_many([results[i] for i in frames]), strict=True):
                results[i] = masks
        return results


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable: {err}") from None


def dataset_form(subset: str, geometry: str | None) -> str:
    """The layout a dataset's maskiges of ``geometry`` go to: VCT's (``source-384``) the 384 layout; COMBO's kind of
    the subset (None, or its name: ``square-224`` for S4/MS3, ``source-224`` for AVSS) the standard one."""
    combo = geometry_for("combo", subset).name
    if geometry in (None, combo):
        return FORM_STANDARD
    if geometry == VCT_GEOMETRY:
        return FORM_384
    raise UsageError(f"--geometry {geometry}: a {subset} dataset's maskiges are {combo} (COMBO, AV2TS) or "
                     f"{VCT_GEOMETRY} (VCT)")


def pregenerate(subset: str, data: str | os.PathLike, masks_from: str | os.PathLike | None = None,
                generator=None, settings=None, device: str = "auto", force: bool = False,
                splits: tuple[str, ...] = SPLITS, progress: bool = True, geometry: str | None = None) -> dict:
    """Write the maskiges of every frame of this process's shard (see the module docstring). ``generator``: an
    ``hf://`` reference, a folder, a loaded ``MaskGenerator`` or None (the default model); ignored with
    ``masks_from``. ``geometry``: None (COMBO's kind, in ``pre_SAM_mask/``) or ``source-384`` (VCT's: the id map
    of the frame as stored, resized to 384 x 384 nearest, in the 384 layout: ``layout.maskiges_384``). Returns
    {"subset", "out", "provenance", "source", "geometry", "rank", "world_size", "frames" (this shard),
    "total_frames", "written", "skipped", "failures": [{"path", "error"}], "seconds",
    "seconds_per_written_frame"}."""
    started = time.perf_counter()
    form = dataset_form(subset, geometry)
    rank, world, local_rank = environment()
    root = resolve_root(data, subset)
    out = maskige_root(root, subset, form)
    record_path = provenance_path(root, subset, form)
    masks = _Masks(subset, masks_from, generator, settings, device_for(device, local_rank, world))
    record = {"made_by": f"av2ts {__version__} maskiges", **masks.record(),
              "renderer": RENDERER_384 if form == FORM_384 else RENDERER}
    if form == FORM_384:
        record["geometry"] = GEOMETRIES[VCT_GEOMETRY].describe()
    previous = _read_record(record_path)
    changed = previous is not None and _identity(previous) != _identity(record)
    if changed and not force:
        raise UsageError(f"{out}: its maskiges were made by {_describe(previous)}, this run uses "
                         f"{_describe(record)}; pass --force to remake every frame (or another --data)")
    jobs = frame_jobs(root, subset, splits, form)
    shard = jobs[rank::world]
    if rank == 0:
        existing = sum(job.target.exists() for job in jobs) if previous is None and not force else 0
        if existing:
            raise UsageError(f"{out}: {existing} maskiges of unknown origin (no {record_path.name}); pass --force "
                             "to remake every frame rather than mix them with this run's")
        if previous is None or changed or force:
            files.write_json(record_path, record)
    else:  # rank 0 checks the folder first: a file of another process would look like one of unknown origin
        _wait_for_record(record_path, record)
    report = {"subset": subset, "out": str(out), "provenance": str(record_path), "source": _describe(record),
              "geometry": VCT_GEOMETRY if form == FORM_384 else geometry_for("combo", subset).name, "rank": rank,
              "world_size": world, "frames": len(shard), "total_frames": len(jobs), "written": 0,
              "skipped": 0, "failures": []}

    bar = make_progress() if progress and rank == 0 else None
    task = bar.add_task(f"maskiges · {subset}", total=len(shard)) if bar else None
    generate_time = 0.0
    try:
        if bar:
            bar.start()
        todo = []
        for job in shard:
            if job.target.exists() and not force:
                report["skipped"] += 1
                if bar:
                    bar.advance(task)
            else:
                todo.append(job)
        size = masks.frames_per_batch() if todo else 1
        for chunk in (todo[i:i + size] for i in range(0, len(todo), size)):
            start = time.perf_counter()
            for job, result in zip(chunk, masks.many(chunk), strict=True):
                error = result if isinstance(result, DataError) else _write(job, result, subset, form)
                if error is None:
                    report["written"] += 1
                else:
                    report["failures"].append({"path": error.path, "error": error.message})
            generate_time += time.perf_counter() - start
            if bar:
                bar.advance(task, len(chunk))
    finally:
        if bar:
            bar.stop()
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["seconds_per_written_frame"] = round(generate_time / report["written"], 4) if report["written"] else None
    return report


def _write(job: FrameJob, masks, subset: str, form: str) -> DataError | None:
    """Write one frame's maskige from its masks (bool [N, H, W]); the ``DataError`` that refused it, else None."""
    try:
        if form == FORM_384:  # the source-size id map, nearest to 384 (every subset alike)
            write_maskige(job.target, masks, "s4", size=GEOMETRIES[VCT_GEOMETRY].size)
        else:
            write_maskige(job.target, masks, subset, train=job.video.split == "train")
    except DataError as err:
        return err
    return None


def _wait_for_record(path: Path, record: dict, timeout: float = RECORD_WAIT_S) -> None:
    """Block until rank 0 has written (or kept) the record of this run; torchrun stops every process if rank 0
    fails, so the timeout only guards against a rank 0 that hangs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = _read_record(path)
        except DataError:  # a broken record (the rename is atomic, so not rank 0's): rank 0 replaces or reports it
            current = None
        if current is not None and _identity(current) == _identity(record):
            return
        if time.monotonic() > deadline:
            raise UsageError(f"{path}: rank 0 did not write the record of this run within {timeout:.0f} s")
        time.sleep(0.1)


def _describe(record: dict) -> str:
    if record.get("source") == "masks-from":
        return f"the masks in {record.get('masks_from')}"
    revision = f" at {record['revision'][:12]}" if record.get("revision") else ""
    return f"{record.get('repo') or record.get('generator')}{revision} ({record.get('model_type')}, " \
           f"{_settings_text(record.get('settings') or {})})"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())
