"""``av2ts predict`` on a batch of videos: the run folder, one lock per video, torchrun's shards, the report.

Each video is done by ``video.predict_video`` under the lock of its folder (``batch.VideoBatch``); a video
that is finished (``summary.json`` with the same input and settings) is skipped unless ``--force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from av2ts_cli import locks, media
from av2ts_cli.batch import VideoBatch
from av2ts_cli.console import console, info, make_progress
from av2ts_cli.errors import UsageError
from av2ts_cli.files import write_json
from av2ts_cli.interrupts import Interrupted, signum_of, stop_on_signals
from av2ts_cli.predict.maskiges import LazyGenerator
from av2ts_cli.predict.options import DEFAULT_RUNS, PredictOptions
from av2ts_cli.predict.outputs import check_overlay_target, discard_unfinished, is_complete, is_video_name, overlay_path
from av2ts_cli.predict.video import VideoResult, predict_video, settings_of
from av2ts_cli.predictor import Predictor, load_predictor
from av2ts_cli.processes import Processes
from av2ts_cli.runs import (
    FAILURES_FILE,
    SUMMARY_FILE,
    claim_folder,
    folder_names,
    foreign_entries,
    numbered_run_folder,
    owned_files,
)


# ---------------------------------------------------------------------------------------------------- batch
@dataclass
class RunReport:
    out: str
    model: dict
    videos: list[VideoResult] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"input", "error"}
    batch: bool = False
    busy: list[dict] = field(default_factory=list)  # {"input", "pid"}: locked by another run, left to it
    processes: int = 1  # torchrun: the processes that shared the videos (the report covers all of them)
    rank: int = 0  # this process's rank: rank 0 prints the report

    @property
    def collects(self) -> bool:
        """Whether a video's failure is recorded and the run goes on (several videos or processes), or raised."""
        return self.batch or self.processes > 1


def run(videos: Sequence[Path], options: PredictOptions, predictor: Predictor | None = None) -> RunReport:
    """Predict every video of ``videos`` (the files ``sources.collect_videos`` gave). One video: its error
    propagates. Several: failures are collected (``failures.json``, merged with what other runs recorded there)
    and the others go on. ``predictor``: an already loaded model (else ``options.model``).

    Each video is done under the lock of its folder (``batch.VideoBatch``): a video another run holds is left to
    it (a line ``x.mp4: in use by av2ts pid N``, counted in ``busy``, not a failure), so two runs into one
    ``--out`` share the work. SIGINT/SIGTERM: the current video's unfinished outputs are removed and
    ``Interrupted`` (exit 130/143) says what was left.

    Under torchrun (WORLD_SIZE > 1) the processes share the videos: process r does every WORLD_SIZE-th video from
    the r-th on, on its own device (``--device cuda``: the GPU of its LOCAL_RANK), into the one output folder rank
    0 chose, with the folder names rank 0 gave. Failures are always collected, not raised; each process records
    its own in ``failures.json`` (under the folder's lock) and, at the end, every process returns the combined
    report, so all of them exit alike (3 when any video failed). A re-run of the same command skips the videos
    that are done, whichever process did them."""
    videos = [Path(video) for video in videos]
    options.check()
    media.check_ffmpeg()  # a broken AV2TS_FFMPEG: one error, not a failure of every video
    batch = len(videos) > 1
    if options.overlay and batch and is_video_name(options.overlay):
        raise UsageError(f"--overlay {options.overlay}: several videos need a folder for their overlays")
    processes = Processes.start(options.device, backend="gloo")
    try:
        return _run(videos, options, predictor, batch, processes)
    finally:
        processes.stop()


def _run(videos: list[Path], options: PredictOptions, predictor: Predictor | None, batch: bool,
         processes: Processes) -> RunReport:
    run_dir: Path | None = None
    created = False
    current: list[Path] = []  # the video being done, for the interrupt's line
    report = None  # this process's
    merged = False  # its failures recorded in failures.json
    shard: list[tuple[Path, str]] = []
    with stop_on_signals():
        try:
            if processes.main:
                if options.out is not None:
                    run_dir = Path(options.out)
                    created = not run_dir.exists()
                    run_dir.mkdir(parents=True, exist_ok=True)
                else:
                    run_dir, created = numbered_run_folder(DEFAULT_RUNS), True
            run_dir, names = processes.broadcast((run_dir, folder_names(videos, run_dir) if processes.main else None))
            if not batch and processes.main:  # one video: what would refuse it is said before the model loads
                _check_targets(videos[0], run_dir / names[0], options)
            if predictor is None:
                predictor = load_predictor(options.model, processes.device, options.half, options.precision)
            generator = None  # one maskige generator for every video; a model without the Siam encoder never makes one
            if predictor.cfg.siam and options.makes_maskiges:
                generator = LazyGenerator(options.generator, options.generator_settings, predictor.device)
            report = RunReport(str(run_dir), predictor.describe(), batch=batch, processes=processes.world_size,
                               rank=processes.rank)
            shard = processes.shard(list(zip(videos, names, strict=True)))
            _run_videos(shard, run_dir, predictor, options, generator, report, current)
            if report.collects:
                _merge_failures(run_dir, report)  # each process its own, under the run folder's lock
                merged = True
            if processes.distributed:  # every process waits for the others here and gets the combined report
                combined = _combined(processes.gather(report), videos, processes.rank)
                processes.finish_together()
                return combined
            return report
        except KeyboardInterrupt as stop:
            done = len(report.videos) + len(report.failures) + len(report.busy) if report else 0
            left = f"{current[0]} left unfinished" if current else "no video started"
            total = len(shard) if report else len(videos)
            rest = total - done - len(current)
            raise Interrupted(signum_of(stop), f"{left}; {done} of {total} videos done or skipped, {rest} not "
                              "started; the same command finishes them") from None
        finally:
            # interrupted: what was done so far (a batch that did nothing writes nothing, so its folder can go)
            if report is not None and report.collects and not merged and (report.videos or report.failures):
                _merge_failures(run_dir, report)
            if created and run_dir is not None:  # nothing written (a single failed video): no empty expN
                with contextlib.suppress(OSError):
                    run_dir.rmdir()


def _combined(reports: list[RunReport], videos: list[Path], rank: int) -> RunReport:
    """The processes' reports as one, each list in the order of ``videos``."""
    order = {str(video): i for i, video in enumerate(videos)}

    def merged(field: str) -> list:
        entries = [entry for part in reports for entry in getattr(part, field)]
        return sorted(entries, key=lambda e: order.get(e.input if isinstance(e, VideoResult) else e["input"], -1))

    return dataclasses.replace(reports[0], rank=rank, videos=merged("videos"), failures=merged("failures"),
                               busy=merged("busy"))


def _run_videos(shard: list[tuple[Path, str]], run_dir: Path, predictor: Predictor, options: PredictOptions,
                generator: LazyGenerator | None, report: RunReport, current: list[Path]) -> None:
    """The videos of ``shard`` (video, folder name), one after the other, each under its folder's lock."""
    videos = VideoBatch(collects=report.collects)
    videos.failures, videos.busy = report.failures, report.busy  # recorded straight into the report
    progress = make_progress() if options.progress and report.rank == 0 else None
    with progress if progress is not None else contextlib.nullcontext():
        videos_task = progress.add_task("videos", total=len(shard)) if progress else None
        windows_task = progress.add_task("windows", total=None) if progress else None

        def one_video(video: Path, folder: Path) -> VideoResult:
            return _video_in_folder(video, folder, predictor, options, report.batch, progress, windows_task,
                                    generator)

        for video, name in shard:
            current[:] = [video]
            result = videos.do(video, run_dir / name, one_video)
            if result is not None:
                report.videos.append(result)
            current.clear()
            if progress is not None:
                progress.advance(videos_task)


def _check_targets(video: Path, folder: Path, options: PredictOptions) -> None:
    """The refusals that need no model, for a single video before its model loads (a batch meets them per video):
    a folder av2ts did not make, an overlay that exists and is not av2ts's, an overlay that is the input."""
    if folder.exists() and not options.force and owned_files(folder) is None and foreign_entries(folder):
        claim_folder(folder)  # raises the UsageError naming the folder
    check_overlay_target(overlay_path(options.overlay, folder, folder.name, False), folder, options.overlay,
                         options.force, video)


def _video_in_folder(video: Path, folder: Path, predictor: Predictor, options: PredictOptions, batch: bool,
                     progress, task, generator: LazyGenerator | None) -> VideoResult:
    """One video in its (locked) folder: a finished video is skipped; a failed or interrupted one leaves no
    unfinished outputs."""
    claim_folder(folder, options.force)  # a folder av2ts did not make: refused unless --force
    finished = False
    try:
        overlay = overlay_path(options.overlay, folder, folder.name, batch)
        if overlay is not None and overlay.parent != folder:  # a shared overlay folder: only this overlay's temps
            locks.sweep_temps(overlay.parent, recursive=False, stem=overlay.stem)
        settings = settings_of(predictor, options, overlay)
        if not options.force and is_complete(folder, video, settings):
            info(f"{video.name}: already done in {folder}, skipped (--force redoes it)")
            finished = True
            return VideoResult(str(video), str(folder), video.name, skipped=True, overlay=settings["overlay"])
        check_overlay_target(overlay, folder, options.overlay, options.force, video)
        result = predict_video(video, folder, predictor, options, settings, overlay, progress, task, generator)
        info(_closing_line(result))
        finished = True
        return result
    finally:
        if not finished and not (folder / SUMMARY_FILE).exists():  # outputs of no finished video: removed
            discard_unfinished(folder)


def _merge_failures(run_dir: Path, report: RunReport) -> None:
    """``failures.json``: this run's failures, and the entries of earlier or concurrent runs for the inputs this
    run did not handle (an input it did or failed replaces its old entry; one it left busy keeps it), written
    atomically under the run folder's lock."""
    handled = {os.path.abspath(v.input) for v in report.videos} | {
        os.path.abspath(f["input"]) for f in report.failures}
    with locks.held(run_dir, wait=60, label=run_dir):
        locks.sweep_temps(run_dir, recursive=False, stem=Path(FAILURES_FILE).stem)
        try:
            previous = json.loads((run_dir / FAILURES_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = []
        kept = [f for f in previous if isinstance(f, dict) and os.path.abspath(str(f.get("input"))) not in handled] \
            if isinstance(previous, list) else []
        write_json(run_dir / FAILURES_FILE, kept + report.failures)


def _closing_line(result: VideoResult) -> str:
    line = (f"{result.name}: {result.duration:.1f} s, {result.frames} masks, {result.windows} windows, "
            f"{result.ms_per_window:.0f} ms/window, peak {result.peak_rss_mb:.0f} MB")
    for warning in result.warnings:
        line += f" ({warning})"
    return line


def print_report(report: RunReport) -> None:
    """The failures table (batch mode) and where the results are."""
    if report.failures:
        table = Table(title=f"{len(report.failures)} of {len(report.failures) + len(report.videos)} inputs failed",
                      title_justify="left")
        table.add_column("input", overflow="fold")
        table.add_column("reason", overflow="fold")
        for failure in report.failures:
            reason = failure["error"]
            prefix = f"{failure['input']}: "
            # Text, not str: a cell string is rich markup, and "[red]x.mp4" is a file name here
            table.add_row(Text(failure["input"]), Text(reason[len(prefix):] if reason.startswith(prefix) else reason))
        console.print(table)
        info(f"Failures listed in {Path(report.out) / FAILURES_FILE}")
    if report.busy:
        info(f"{len(report.busy)} video{'s' if len(report.busy) > 1 else ''} in use by another av2ts run, left to "
               "it (not failed; the same command afterwards reports them done)")
    info(f"Results saved to {report.out}")
