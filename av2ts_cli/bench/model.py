"""``av2ts bench model``: eval forward time per clip of the network, with the share of each part.

Each case builds a randomly initialised preset (or loads a checkpoint: ``weights.resolve_model``; AV2TS or COMBO),
feeds one clip of T frames (random frames, maskiges when the preset
uses the Siam encoder, random log-mel examples) and times ``repeats`` forwards under ``torch.inference_mode`` after
one warm-up; the median is reported. Forward hooks on the top-level parts time them in the same runs (CPU ops are
synchronous, so the hooks see the real cost). The baseline, measured in the same process before and after the
cases, is a ResNet-50 trunk on the same T frames at 224 px (performance.md 4.1: 351-356 ms fp32 with 2 threads on
this machine kind when it is idle), so figures taken on a busy machine still compare. On a machine shared with
other jobs, ``--threads 1`` gives steadier figures: two threads spin at every op's barrier whenever the other
core is taken.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import timm
import torch
from rich.table import Table

from av2ts_cli.config import EXAMPLE_FRAMES, MEL_BANDS
from av2ts_cli.console import console
from av2ts_cli.model.ops import active_backend
from av2ts_cli.weights import resolve_model

# Top-level modules of both families grouped into the parts reported: "audio" is CED (AV2TS) or VGGish (COMBO),
# "fusion" OSA (AV2TS) or the bilateral fusion + audio MLP (COMBO); COMBO has no DSTA (a part a network lacks is
# left out of its parts_s).
PARTS = {
    "backbone": ("backbone", "siam_backbone", "siam_gates"),
    "audio": ("audio_encoder",),
    "DSTA": ("acoustic_attention", "visual_attention"),
    "pixel decoder": ("pixel_decoder",),
    "fusion": ("fusion",),
    "decoder": ("decoder",),
}
REFERENCE_CASE = ("av2ts-r50", 224)  # timed beside every --model, so a COMBO figure has AV2TS's in the same run


@dataclass
class ModelTiming:
    name: str  # what was asked for: a preset or a checkpoint
    preset: str
    family: str
    input_size: int
    frames: int
    siam: bool
    parameters: int
    median_s: float
    runs_s: list[float]
    parts_s: dict[str, float] = field(default_factory=dict)  # median seconds per part
    ratio_to_baseline: float = 0.0


def _precision(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _time_calls(fn, repeats: int, max_warmup: int = 8) -> list[float]:
    # The first calls pay for fresh memory pages (slow in this VM), oneDNN primitives and the kernel JIT: warm up
    # until two consecutive calls agree within 15 %, or max_warmup calls.
    previous = None
    for _ in range(max_warmup):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if previous is not None and abs(elapsed - previous) <= 0.15 * min(elapsed, previous):
            break
        previous = elapsed
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return runs


def baseline_resnet50(frames: int = 5, repeats: int = 5, bf16: bool = False) -> float:
    """Median seconds of a ResNet-50 trunk (timm, features only) on ``frames`` 224 px images."""
    trunk = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    images = torch.randn(frames, 3, 224, 224)
    if bf16:
        trunk = trunk.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _precision(bf16):
        return statistics.median(_time_calls(lambda: trunk(images), repeats))


def time_model(name: str, input_size: int | None = None, frames: int = 5, repeats: int = 5,
               bf16: bool = False, seed: int = 0) -> ModelTiming:
    """Median eval forward time of one clip of ``frames`` frames through ``name``: a preset (s4 head, random init)
    or any checkpoint ``weights.resolve_model`` accepts."""
    torch.manual_seed(seed)
    model, cfg, _ = resolve_model(name, presets=True)
    size = input_size or cfg.input_size
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    images = torch.rand(1, frames, 3, size, size) * 255
    audio = torch.randn(1, frames, EXAMPLE_FRAMES, MEL_BANDS) - 2.0
    maskiges = torch.rand(1, frames, 3, size, size) * 255 if cfg.siam else None

    spent: dict[str, list[float]] = {part: [] for part in PARTS}
    current: dict[str, float] = {}

    def start(name):
        def hook(module, args):
            current[name] = time.perf_counter()
        return hook

    def stop(part, name):
        def hook(module, args, output):
            spent[part][-1] += time.perf_counter() - current[name]
        return hook

    handles = []
    for part, modules in PARTS.items():
        for module_name in modules:
            module = getattr(model, module_name, None)
            if module is not None:
                handles.append(module.register_forward_pre_hook(start(module_name)))
                handles.append(module.register_forward_hook(stop(part, module_name)))

    def forward():
        for times in spent.values():
            times.append(0.0)
        model(images, audio, maskiges)

    with torch.inference_mode(), _precision(bf16):
        runs = _time_calls(forward, repeats)
    for handle in handles:
        handle.remove()
    present = {part for part, names in PARTS.items() if any(getattr(model, n, None) is not None for n in names)}
    parts = {part: statistics.median(times[-repeats:]) for part, times in spent.items()  # without the warm-up
             if part in present}
    return ModelTiming(name, cfg.preset, cfg.family, size, frames, cfg.siam,
                       sum(p.numel() for p in model.parameters()), statistics.median(runs), runs, parts)


def run(cases: list[tuple[str, int | None]], frames: int = 5, repeats: int = 5, bf16: bool = False,
        threads: int | None = None) -> dict:
    """Time every (preset or checkpoint, input size or None for the model's own) case against the ResNet-50
    baseline."""
    if threads:
        torch.set_num_threads(threads)
    before = baseline_resnet50(frames, repeats, bf16)
    timings = [time_model(preset, size, frames, repeats, bf16) for preset, size in cases]
    # measured again at the end: the first seconds of a process are slow here (fresh memory pages), so the
    # faster of the two is the fair baseline
    baseline = min(before, baseline_resnet50(frames, repeats, bf16))
    for timing in timings:
        timing.ratio_to_baseline = timing.median_s / baseline
    return {
        "deform_attn_backend": active_backend(),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast + channels_last" if bf16 else "fp32",
        "frames_per_clip": frames,
        "repeats": repeats,
        "baseline": {"name": f"resnet50 trunk, {frames} frames at 224 px", "median_s": baseline},
        "results": [vars(t) for t in timings],
    }


def print_report(report: dict) -> None:
    console.print(f"eval forward per clip of {report['frames_per_clip']} frames, {report['precision']}, "
                  f"{report['threads']} threads, deform-attn backend: {report['deform_attn_backend']}")
    times = Table(title="time per clip (median)")
    for column in ("model", "input", "params", "ms", "x baseline"):
        times.add_column(column, justify="left" if column == "model" else "right")
    shares = Table(title="share of the parts")
    for column in ("model", "input", *PARTS):
        shares.add_column(column, justify="left" if column == "model" else "right")
    for r in report["results"]:
        name = r["name"] + (f" ({r['preset']})" if r["name"] != r["preset"] else "") + (" +siam" if r["siam"] else "")
        times.add_row(name, f"{r['input_size']}", f"{r['parameters'] / 1e6:.1f} M", f"{r['median_s'] * 1000:.0f}",
                      f"{r['ratio_to_baseline']:.2f}")
        total = sum(r["parts_s"].values()) or 1.0
        shares.add_row(name, f"{r['input_size']}", *(f"{100 * r['parts_s'][p] / total:.0f}%" if p in r["parts_s"]
                                                     else "-" for p in PARTS))
    console.print(times)
    console.print(shares)
    base = report["baseline"]
    console.print(f"baseline: {base['name']}: {base['median_s'] * 1000:.0f} ms (median of {report['repeats']})")
