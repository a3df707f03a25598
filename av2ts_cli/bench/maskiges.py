"""``av2ts bench maskiges``: seconds per frame of automatic maskige masks, as a ratio to one image-encoder forward.

One ``MaskGenerator`` per device and generator (``--generator``, repeatable: SAM, SAM-HQ or SAM 2 folders or hub
references; default the pinned SAM ViT-B) makes the masks of ``frames``
frames of ffmpeg's testsrc2 pattern (``media.synthesize_clip``, at each of ``sizes``: 224x224 and 1280x720) for
each points-per-side setting (default 32, COMBO's, and 16) and each precision (fp32, and the one ``auto`` picks
where it is another: the bf16 column "x fp32" is the ratio of the same run); the median per frame is reported with
the masks it kept. ``--keep-all`` sets the IoU and stability thresholds to 0: every mask reaches the
post-processing (its worst case). The baseline is one
forward of the same model's image encoder (``get_image_embeddings`` on the preprocessed frame, with the memory
reuse the generator runs with: ``memory.reused_heap``) timed in the same
process before and after the cases (the faster of the two: a process's first seconds are slow in this VM), so a
ratio holds on a busy machine too. Every frame costs one encoder forward plus ``points_per_side**2`` point prompts
through the prompt encoder and mask decoder (``points_per_batch`` at a time), and the upscaling, stability
filter and NMS of the masks that pass the IoU threshold; the ratio says how much the prompts add.

Random weights (a randomly initialised model of the same size) time the encoder and the decoder as trained ones
do, but pass other numbers of masks to the post-processing; the report gives the masks per frame for that
reason. CUDA is timed too when available (``torch.cuda.synchronize`` around each call).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from rich.table import Table

from av2ts_cli import media
from av2ts_cli.console import console
from av2ts_cli.maskiges.generate import DEFAULT_GENERATOR, GeneratorSettings
from av2ts_cli.memory import reused_heap

DEFAULT_POINTS = (32, 16)
# the S4/MS3 maskige geometry (the 224 square) and a phone video's frame (the source geometry: SAM resizes it to
# 1024 on the long side, the masks come back at its size, so post-processing costs more)
DEFAULT_SIZES = ((224, 224), (1280, 720))
QUICK_SIZE = (320, 180)


def _frames(count: int, size: tuple[int, int]):
    """``count`` RGB frames uint8 [H, W, 3] of the testsrc2 pattern, 1 s apart."""
    with tempfile.TemporaryDirectory(prefix="av2ts-bench-maskiges-") as folder:
        clip = media.synthesize_clip(Path(folder) / "pattern.mp4", count, size, fps=5, audio=False)
        return list(media.decode_frames_at(clip, [k + 0.5 for k in range(count)]))


def _timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def time_device(generator, frames: list, points: tuple[int, ...], repeats: int) -> dict:
    """Encoder and per-setting timings of a loaded ``MaskGenerator`` on its device, on ``frames`` (all of one
    size): {"encoder_s", "cases": [{"points_per_side", "seconds_per_frame", "runs_s", "masks_per_frame",
    "ratio_to_encoder"}]}."""
    import torch  # local: the CLI module imports this one for --help; torch takes seconds

    device = generator.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs = generator.processor(images=frames[0], return_tensors="pt")
    pixels = inputs["pixel_values"].to(device, generator.model.dtype)

    def encoder_runs() -> list[float]:
        with torch.inference_mode(), reused_heap():  # as the generator runs it
            _timed(lambda: generator.model.get_image_embeddings(pixels), sync)  # warm-up (allocations, kernels)
            return [_timed(lambda: generator.model.get_image_embeddings(pixels), sync) for _ in range(repeats)]

    before = statistics.median(encoder_runs())
    base = generator.settings
    cases = []
    for side in points:
        generator.settings = dataclasses.replace(base, points_per_side=side)
        generator.generate(frames[0])  # warm-up at this grid size
        runs, kept = [], []
        for frame in frames:
            out = []
            runs.append(_timed(lambda f=frame, o=out: o.append(generator.generate(f)), sync))
            kept.append(len(out[0]))
        cases.append({"points_per_side": side, "seconds_per_frame": statistics.median(runs), "runs_s": runs,
                      "masks_per_frame": statistics.median(kept)})
    generator.settings = base
    encoder = min(before, statistics.median(encoder_runs()))
    for case in cases:
        case["ratio_to_encoder"] = case["seconds_per_frame"] / encoder
    return {"encoder_s": encoder, "cases": cases}


def default_precisions(device: str) -> tuple[str, ...]:
    """fp32, and the precision ``auto`` picks on ``device`` where it is another (on a CPU: measured)."""
    from av2ts_cli.processes import resolve_device, resolve_precision  # local: torch

    chosen, _ = resolve_precision(None, resolve_device(device))
    return ("fp32",) if chosen == "fp32" else ("fp32", chosen)


def run(generator: str | None = None, points: tuple[int, ...] = DEFAULT_POINTS, frames: int = 3,
        sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES, repeats: int = 3,
        devices: tuple[str, ...] | None = None, precisions: tuple[str, ...] | None = None,
        threads: int | None = None, settings: dict | None = None, progress=None) -> dict:
    """Time the generator on each of ``devices`` (default: cpu, and cuda where available), in each of
    ``precisions`` (default ``default_precisions``), on frames of each of ``sizes``: one result per device and
    precision, its cases per size and points per side (each case's ratio is to the encoder timed on that size)."""
    import torch  # local: as in time_device

    # local: transformers (~8 s to import) and torch behind the generator; --help must not wait for them
    from av2ts_cli.maskiges.generate import MaskGenerator

    if threads:
        torch.set_num_threads(threads)
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    pictures = {size: _frames(frames, size) for size in sizes}
    results, description, parameters, encoder_parameters = [], {}, 0, 0
    for device in devices:
        for precision in precisions or default_precisions(device):
            if progress is not None:
                progress(f"loading the generator on {device} ({precision})")
            model = MaskGenerator(generator, GeneratorSettings(**(settings or {})), device, precision)
            cases, encoders = [], []
            for size, frames_of_size in pictures.items():
                if progress is not None:
                    progress(f"timing on {device} ({precision}) at {size[0]}x{size[1]}")
                timed = time_device(model, frames_of_size, points, repeats)
                encoders.append(timed["encoder_s"])
                cases += [{"size": list(size), "encoder_s": timed["encoder_s"], **case} for case in timed["cases"]]
            name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
            results.append({"device": str(model.device), "device_name": name, "precision": model.precision,
                            "encoder_s": min(encoders), "cases": cases})
            description = model.describe()
            parameters = sum(p.numel() for p in model.model.parameters())
            encoder_parameters = sum(p.numel() for p in model.model.vision_encoder.parameters())
            del model
    _compare_precisions(results)
    return {"generator": description.get("generator", generator or DEFAULT_GENERATOR),
            "repo": description.get("repo"), "revision": description.get("revision"),
            "model_type": description.get("model_type"), "parameters": parameters,
            "image_encoder_parameters": encoder_parameters, "settings": description.get("settings", {}),
            "frames": frames, "frame_sizes": [list(size) for size in sizes], "repeats": repeats,
            "threads": torch.get_num_threads(), "results": results}


def _compare_precisions(results: list[dict]) -> None:
    """Each case of a non-fp32 result gets ``vs_fp32``: its time per frame over the fp32 result's on the same
    device, size and points (the same run, so the ratio holds on a busy machine)."""
    fp32 = {(r["device"], tuple(c["size"]), c["points_per_side"]): c["seconds_per_frame"]
            for r in results if r["precision"] == "fp32" for c in r["cases"]}
    for result in results:
        for case in result["cases"]:
            base = fp32.get((result["device"], tuple(case["size"]), case["points_per_side"]))
            case["vs_fp32"] = case["seconds_per_frame"] / base if base and result["precision"] != "fp32" else None


def run_generators(generators: tuple[str | None, ...], **options) -> dict:
    """``run`` for each of ``generators`` in one process (so their ratios compare): {"generators": [reports]}."""
    return {"generators": [run(generator, **options) for generator in generators]}


def print_report(report: dict) -> None:
    """One generator's report, or each of ``run_generators``'."""
    for one in report.get("generators", [report]):
        _print_one(report=one)


def _print_one(report: dict) -> None:
    settings = {k: v for k, v in report["settings"].items() if k != "points_per_side"}
    sizes = ", ".join(f"{w}x{h}" for w, h in report["frame_sizes"])
    console.print(f"automatic masks of {report['generator']} ({report['model_type']}, "
                  f"{report['parameters'] / 1e6:.1f} M parameters, image encoder "
                  f"{report['image_encoder_parameters'] / 1e6:.1f} M) on {report['frames']} frames of "
                  f"{sizes}, {report['threads']} CPU threads", highlight=False, soft_wrap=True)
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), highlight=False,
                  soft_wrap=True)
    table = Table(title="seconds per frame (median); points: per side; masks: per frame")
    for column in ("device", "frame", "points", "s / frame", "masks", "encoder s", "x encoder", "x fp32"):
        table.add_column(column, justify="left" if column == "device" else "right", no_wrap=True)
    for result in report["results"]:
        for case in result["cases"]:
            versus = f"{case['vs_fp32']:.2f}" if case.get("vs_fp32") is not None else "-"
            table.add_row(f"{result['device_name']} {result['precision']}", "x".join(map(str, case["size"])),
                          str(case["points_per_side"]), f"{case['seconds_per_frame']:.3f}",
                          f"{case['masks_per_frame']:g}", f"{case['encoder_s']:.3f}",
                          f"{case['ratio_to_encoder']:.2f}", versus)
    console.print(table)
