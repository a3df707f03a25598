"""``av2ts maskiges clip.mp4 ... --out DIR``: the maskiges of exactly the frames ``predict`` samples.

Per video, ``DIR/<name>/NNNNNN.png``: the frame shown at the time of mask NNNNNN (``sampling.video_schedule``, the
schedule ``predict`` runs with the same ``--fps``), an indexed 224 x 224 maskige (COMBO's S4 form), where
``predict --maskiges DIR`` reads it. ``<name>`` is the folder name ``predict`` gives the video in a fresh run
(its stem; stem-2, ... for repeated stems). ``maskiges.json`` beside the pictures records the video, ``--fps``,
the generator, its revision and settings; a re-run with the same ones skips the pictures that exist, and with
other ones remakes them all. The geometry (``render.GEOMETRIES``, ``geometry``; recorded in ``maskiges.json``)
says what the generator sees: by default (``square-224``, S4's) the frame squashed to 224 x 224 as the network sees
it (decoded at that size), as COMBO's S4/MS3 maskiges were made from AVSBench's 224 px frames; ``source-224``
(AVSS) and ``source-384`` (VCT) decode the frame at the video's own size and resize the id map after the masks
(SAM resizes its input to 1024 either way). ``predict`` picks the model's (``render.geometry_for``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rich.markup import escape

from av2ts_cli import __version__, files, media
from av2ts_cli.batch import VideoBatch
from av2ts_cli.console import make_progress
from av2ts_cli.maskiges.dataset import RENDERER
from av2ts_cli.maskiges.render import DEFAULT_GEOMETRY, GEOMETRIES, write_maskige
from av2ts_cli.runs import MASKIGES_RECORD, claim_folder, folder_names, owned_files, record_owned, remove_owned
from av2ts_cli.sampling import video_schedule
from av2ts_cli.sources import collect_videos


def _video_identity(video: Path) -> dict:
    stat = video.stat()
    return {"input": str(video.resolve()), "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def _same_run(previous: dict | None, record: dict) -> bool:
    keys = ("input", "input_bytes", "input_mtime_ns", "fps", "repo", "revision", "generator", "model_type",
            "settings", "geometry")
    return previous is not None and all(previous.get(k) == record.get(k) for k in keys)


def _read_record(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no record, or a broken one: the folder's pictures are remade


def video_maskiges(video: Path, folder: Path, generator, fps: int = 1, force: bool = False,
                   on_start=None, on_frame=None, info: media.Probe | None = None,
                   geometry: str = DEFAULT_GEOMETRY) -> dict:
    """The maskiges of one video into ``folder``; ``generator``: a loaded ``MaskGenerator``. Returns {"input",
    "folder", "frames", "written", "skipped", "seconds"}. Progress: ``on_start(frames to make)``, then
    ``on_frame()`` after each. ``info``: the caller's probe of ``video`` (predict's), else it is probed here.
    ``geometry``: a name of ``render.GEOMETRIES`` (what the generator sees, the maskige's size)."""
    started = time.perf_counter()
    info = info or media.probe(video)
    schedule = video_schedule(info, fps, 1)
    record = {"made_by": f"av2ts {__version__} maskiges", **_video_identity(video), "fps": fps,
              **generator.describe(), "renderer": RENDERER, "geometry": GEOMETRIES[geometry].describe(),
              "frames": len(schedule.frames),
              "times": [frame.time for frame in schedule.frames], "complete": False}
    record_path = folder / MASKIGES_RECORD
    reuse = not force and _same_run(_read_record(record_path), record)
    claim_folder(folder, force)  # a folder av2ts did not make: refused unless --force
    if not reuse:  # the pictures an earlier run wrote here (its record), never anything else
        remove_owned(folder, [name for name in owned_files(folder) or [] if name != MASKIGES_RECORD])
    record_owned(folder, [MASKIGES_RECORD, *(f"{frame.index:06d}.png" for frame in schedule.frames)])
    files.write_json(record_path, record)
    needed = [f for f in schedule.frames if not (reuse and (folder / f"{f.index:06d}.png").is_file())]
    written = 0
    if on_start is not None:
        on_start(len(needed))
    if needed:
        # iter_frames_at yields in ascending time; the schedule's times ascend with the index, and sorted()
        # keeps equal (clamped) times in index order, so the pairs line up
        frames = sorted(needed, key=lambda f: f.time)
        side = GEOMETRIES[geometry].input_side
        decoded = media.iter_frames_at(video, [f.time for f in frames], (side, side) if side else None, info=info)
        try:
            pairs = zip(frames, (rgb for _, rgb in decoded), strict=True)
            for chunk in iter(lambda: list(itertools.islice(pairs, generator.frames_per_batch)), []):
                for (frame, _), masks in zip(chunk, generator.generate_many([rgb for _, rgb in chunk]),
                                             strict=True):
                    write_maskige(folder / f"{frame.index:06d}.png", masks, "s4", size=GEOMETRIES[geometry].size)
                    written += 1
                    if on_frame is not None:
                        on_frame()
        finally:
            decoded.close()
    files.write_json(record_path, {**record, "complete": True})
    return {"input": str(video), "folder": str(folder), "frames": len(schedule.frames), "written": written,
            "skipped": len(schedule.frames) - written, "seconds": round(time.perf_counter() - started, 3)}


def run(sources: Sequence[str | os.PathLike], out: str | os.PathLike, generator=None, settings=None, fps: int = 1,
        device: str = "auto", force: bool = False, recursive: bool = False, progress: bool = True,
        geometry: str = DEFAULT_GEOMETRY) -> dict:
    """The maskiges of every video of ``sources`` (files, folders, globs as ``predict`` takes them) under
    ``out``, each under its folder's lock (``batch.VideoBatch``): one failing video is reported and the others go
    on; one that another run holds is left to it. Returns {"out", "videos": [...], "failures": [{"input",
    "error"}], "busy": [{"input", "pid"}], "generator": {...}, "seconds"}."""
    # local: the SAM generator imports transformers (seconds); only this form of the command needs it
    from av2ts_cli.maskiges.generate import MaskGenerator

    started = time.perf_counter()
    out = Path(out)
    videos = collect_videos(sources, recursive)
    names = folder_names(videos, out)
    model = generator if isinstance(generator, MaskGenerator) else MaskGenerator(generator, settings, device)
    batch = VideoBatch(collects=True)
    report = {"out": str(out), "videos": [], "failures": batch.failures, "busy": batch.busy,
              "generator": model.describe()}
    bar = make_progress() if progress else None
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task("maskiges", total=None) if bar else None

        def one_video(video: Path, folder: Path) -> dict:
            return video_maskiges(
                video, folder, model, fps=fps, force=force, geometry=geometry,
                on_start=(lambda n: bar.update(task, description=f"maskiges · {escape(video.name)}", completed=0,
                                               total=n)) if bar else None,
                on_frame=(lambda: bar.advance(task)) if bar else None)

        for video, name in zip(videos, names, strict=True):
            result = batch.do(video, out / name, one_video)
            if result is not None:
                report["videos"].append(result)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
