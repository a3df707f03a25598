"""The ``av2ts maskiges`` command: which form (dataset or videos) the options ask for, and its report lines."""

from __future__ import annotations

from pathlib import Path

from av2ts_cli.console import info, print_json
from av2ts_cli.data.layout import check_subset
from av2ts_cli.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from av2ts_cli.maskiges import dataset, video
from av2ts_cli.maskiges.generate import GeneratorSettings
from av2ts_cli.maskiges.render import DEFAULT_GEOMETRY, GEOMETRIES


def run_command(sources: list[str] | None, *, subset: str | None, data: Path | None, masks_from: Path | None,
                out: Path | None, fps: int, generator: str | None, settings: dict, device: str, force: bool,
                recursive: bool, as_json: bool, geometry: str | None = None) -> int:
    """Run the form the options name; print the report (``as_json``: one JSON object on stdout). Returns the exit
    code: 0, or EXIT_PARTIAL when some frames or videos failed (each named on its own line). ``geometry``
    (``render.GEOMETRIES``): videos, None for S4's; a dataset, None for COMBO's kind of the subset or ``source-384``
    for VCT's (``dataset.dataset_form``)."""
    if geometry is not None and geometry not in GEOMETRIES:
        raise UsageError(f"--geometry {geometry}: not one of {', '.join(GEOMETRIES)}")
    if sources:
        if subset is not None or data is not None or masks_from is not None:
            raise UsageError("give videos (with --out) or --subset and --data, not both")
        if out is None:
            raise UsageError("maskiges of videos need --out DIR (the folder predict --maskiges DIR reads)")
        report = video.run(sources, out, generator=generator, settings=GeneratorSettings(**settings), fps=fps,
                           device=device, force=force, recursive=recursive, progress=not as_json,
                           geometry=geometry or DEFAULT_GEOMETRY)
        _print_videos(report, as_json)
        return EXIT_PARTIAL if report["failures"] else EXIT_OK
    if subset is None or data is None:
        raise UsageError("give videos with --out DIR, or a dataset with --subset and --data")
    if masks_from is not None and generator is not None:
        raise UsageError("--masks-from and --generator exclude each other (the masks are made already)")
    if out is not None:
        raise UsageError("--out is for videos; dataset maskiges go to the dataset's pre_SAM_mask/ folder")
    check_subset(subset)
    dataset.dataset_form(subset, geometry)  # a geometry the dataset form has no place for: refused before any work
    report = dataset.pregenerate(subset, data, masks_from=masks_from, generator=generator,
                                 settings=None if masks_from else GeneratorSettings(**settings), device=device,
                                 force=force, progress=not as_json, geometry=geometry)
    _print_dataset(report, as_json)
    return EXIT_PARTIAL if report["failures"] else EXIT_OK


def _print_dataset(report: dict, as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    prefix = f"[rank {report['rank']}/{report['world_size']}] " if report["world_size"] > 1 else ""
    for failure in report["failures"]:
        info(f"{prefix}failed: {failure['error']}")
    per_frame = report["seconds_per_written_frame"]
    speed = f", {per_frame:.3f} s/frame" if per_frame is not None else ""
    shard = f" of this process's {report['frames']} (all processes: {report['total_frames']})" \
        if report["world_size"] > 1 else f" of {report['frames']} frames"
    info(f"{prefix}{report['written']} maskiges written, {report['skipped']} already there, "
          f"{len(report['failures'])} failed{shard} in {report['seconds']:.1f} s{speed}")
    info(f"{prefix}Maskiges in {report['out']} (made by {report['source']}; record: {report['provenance']})")


def _print_videos(report: dict, as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    for result in report["videos"]:
        info(f"{Path(result['input']).name}: {result['frames']} maskiges ({result['written']} made, "
              f"{result['skipped']} already there) in {result['seconds']:.1f} s")
    # the failures and the videos another run holds were said as they happened (batch.VideoBatch)
    info(f"Maskiges saved to {report['out']} (predict --maskiges {report['out']})")
