"""``av2ts bench model``: eval forward time per clip of the network: the inference levers one by one against the
fp32 eager forward (``run_levers``, the default run), or the share of each part (``run``, for --preset/--model).

The levers (model/inference.py), timed on one model in one run, interleaved (round robin, so a load change on a
shared machine hits every step alike), each step adding one to the previous: bf16 autocast + channels_last
(``--half`` before issue 14), the weights cast to bf16 once (the whole forward in bf16, pixel decoder included),
channels_last, FrozenBatchNorm folded, the decoder's intermediate masks made at the attention sizes only (the
default path), optionally ``torch.compile`` of the backbones, and
the default path with one thread. Each step's argmax agreement with fp32 is measured on its last output (random
weights), and the default path's again on the bundled demo model (real weights) over the demo video's clips.

Each case builds a randomly initialised preset (or loads a checkpoint: ``weights.resolve.resolve_model``; any
family), feeds one clip of T frames (random frames, maskiges when the preset uses the Siam encoder, random log-mel
examples) and times ``repeats`` forwards under ``torch.inference_mode`` after one warm-up; the median is reported.
Forward hooks on the top-level parts time them in the same runs (CPU ops are synchronous, so the hooks see the real
cost). The baseline, measured in the same process before and after the cases, is a ResNet-50 trunk on the same T
frames at 224 px (docs/model.md, 'Cost on a CPU': 351-356 ms fp32 with 2 threads on this machine kind when it is
idle), so figures taken on a busy machine still compare. On a machine shared with other jobs, ``--threads 1`` gives
steadier figures: two threads spin at every op's barrier whenever the other core is taken.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field

import timm
import torch
from rich.table import Table

from av2ts_cli.config import EXAMPLE_FRAMES, MEL_BANDS
from av2ts_cli.console import console
from av2ts_cli.model.ops import active_backend
from av2ts_cli.processes import cpu_precision
from av2ts_cli.weights.resolve import resolve_model

# Top-level modules of the families grouped into the parts reported: "audio" is CED (AV2TS) or VGGish (COMBO;
# VCT's with its per-token audio MLP), "fusion" OSA (AV2TS) or the bilateral fusion + audio MLP (COMBO), "decoder"
# the masked-attention decoder (VCT's with its query generator), "head" AVSegFormer's whole head (encoder, query
# generator, decoder, mixer, prediction convs) with its audio projection; COMBO and VCT have no DSTA, VCT no fusion,
# AVSegFormer only backbone, audio and head (a part a network lacks is left out of its parts_s).
PARTS = {
    "backbone": ("backbone", "siam_backbone", "siam_gates"),
    "audio": ("audio_encoder", "audio_mlp"),
    "DSTA": ("acoustic_attention", "visual_attention"),
    "pixel decoder": ("pixel_decoder",),
    "fusion": ("fusion",),
    "decoder": ("queries", "decoder"),
    "head": ("head", "audio_proj"),
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
    or any checkpoint ``weights.resolve.resolve_model`` accepts."""
    torch.manual_seed(seed)
    model, cfg, _ = resolve_model(name, presets=True)
    size = input_size or cfg.input_size
    if bf16:  # the default path on a CPU with native bf16 (model/inference.py)
        from av2ts_cli.model.inference import prepare_for_inference  # local: keeps this module's import light

        model = prepare_for_inference(model, "bf16", "cpu")
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
        "precision": "bf16 (weights bf16, BatchNorm folded, channels_last)" if bf16 else "fp32",
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


# ------------------------------------------------------------------------------------------------------ levers
LEVER_CASES = [("av2ts-r50", 224), ("av2ts-pvt", 224)]  # AV2TS presets: the Siam encoder on


@dataclass
class Step:
    """One configuration of the ladder: how to prepare the model and run it."""

    name: str
    lever: str  # what this step adds to the previous one
    precision: str
    prepare: dict | None  # prepare_for_inference keywords; None: the model as loaded (eager, no preparation)
    channels_last_only: bool = False  # the old --half: channels_last + autocast on fp32 weights
    threads: int | None = None


def lever_steps(compile_backbones: bool, threads: int) -> list[Step]:
    """The ladder, cumulative: each step is the previous one plus its lever."""
    steps = [
        Step("fp32 eager", "-", "fp32", None),
        Step("bf16 autocast + channels_last", "bf16 autocast, channels_last (the old --half)", "bf16", None,
             channels_last_only=True),
        Step("bf16 weights", "weights cast to bf16 once: the whole forward in bf16", "bf16",
             {"fold": False, "channels_last": False, "lean_decoder": False}),
        Step("+ channels_last", "channels_last", "bf16", {"fold": False, "lean_decoder": False}),
        Step("+ BN folded", "FrozenBatchNorm folded into the convolutions", "bf16", {"lean_decoder": False}),
        Step("+ lean decoder", "intermediate decoder masks at the attention sizes only (no copies at H/4)", "bf16",
             {}),
    ]
    if compile_backbones:
        steps.append(Step("+ compiled backbones", "torch.compile (inductor) of the backbones", "bf16",
                          {"compile": True}))
    if threads > 1:
        last = steps[-1]
        steps.append(Step(f"{last.name}, 1 thread", f"1 thread instead of {threads}", last.precision, last.prepare,
                          threads=1))
    return steps


def _prepared(model, step: Step):
    from av2ts_cli.model.inference import prepare_for_inference  # local: keeps this module's import light

    if step.prepare is None:
        copy_ = copy.deepcopy(model).eval()
        return copy_.to(memory_format=torch.channels_last) if step.channels_last_only else copy_
    return prepare_for_inference(copy.deepcopy(model), step.precision, "cpu", **step.prepare)


def agreement(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of pixels whose argmax class agrees: scores, reference [..., K, H, W] semantic maps."""
    return float((scores.argmax(-3) == reference.argmax(-3)).double().mean())


def time_levers(name: str, input_size: int, frames: int = 5, repeats: int = 3, compile_backbones: bool = False,
                seed: int = 0, progress=None) -> dict:
    """The ladder of ``lever_steps`` on ``name`` (random init): median wall and CPU seconds of ``segment`` per
    clip, each step's gain over the previous, its ratio to fp32 eager and its argmax agreement with fp32."""
    from av2ts_cli.model.inference import compile_seconds, precision_context  # local: as above

    torch.manual_seed(seed)
    model, cfg, _ = resolve_model(name, presets=True)
    model.eval()
    images = torch.rand(1, frames, 3, input_size, input_size) * 255
    audio = torch.randn(1, frames, EXAMPLE_FRAMES, MEL_BANDS) - 2.0
    maskiges = torch.rand(1, frames, 3, input_size, input_size) * 255 if cfg.siam else None
    threads = torch.get_num_threads()
    steps = lever_steps(compile_backbones, threads)
    prepared = [_prepared(model, step) for step in steps]
    del model
    wall: list[list[float]] = [[] for _ in steps]
    cpu: list[list[float]] = [[] for _ in steps]
    outputs: list[torch.Tensor | None] = [None] * len(steps)
    compile_s = 0.0
    # round 0 is the warm-up (fresh pages, oneDNN primitives, the kernel JIT, compilation), then ``repeats`` rounds
    for round_ in range(repeats + 1):
        for i, (step, net) in enumerate(zip(steps, prepared, strict=True)):
            if progress is not None:
                progress(f"{name}: {step.name} ({round_}/{repeats})")
            torch.set_num_threads(step.threads or threads)
            try:
                with torch.inference_mode(), precision_context(step.precision, "cpu"):
                    start_cpu, start = time.process_time(), time.perf_counter()
                    outputs[i] = net.segment(images, audio, maskiges)
                    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            finally:
                torch.set_num_threads(threads)
            if round_ == 0 and step.prepare is not None and step.prepare.get("compile"):
                compile_s = compile_seconds(net)
            if round_ > 0:
                wall[i].append(elapsed)
                cpu[i].append(elapsed_cpu)
    fp32 = statistics.median(wall[0])
    rows = []
    for i, step in enumerate(steps):
        median = statistics.median(wall[i])
        previous = statistics.median(wall[i - 1]) if i else median  # the thread step follows its own model's
        rows.append({"step": step.name, "lever": step.lever, "median_s": median, "runs_s": wall[i],
                     "cpu_s": statistics.median(cpu[i]), "gain": previous / median, "x_fp32": fp32 / median,
                     "argmax_agreement": agreement(outputs[i], outputs[0])})
    default = _default_step(steps, cpu_precision()["precision"])  # measured (cached) at this thread count
    return {"name": name, "preset": cfg.preset, "input_size": input_size, "frames": frames, "siam": cfg.siam,
            "threads": threads, "steps": rows, "default_step": steps[default].name,
            "default_median_s": rows[default]["median_s"], "fp32_median_s": fp32,
            "ratio": fp32 / rows[default]["median_s"], "default_argmax_agreement": rows[default]["argmax_agreement"],
            "compile_s": compile_s}


def _default_step(steps: list[Step], precision: str) -> int:
    """Index of the step that is the default path (prepare_for_inference's defaults in ``precision``)."""
    if precision == "fp32":
        return 0
    return next(i for i, step in enumerate(steps) if step.prepare == {} and step.threads is None)


def demo_agreement(frames: int = 5) -> dict:
    """The bundled demo model (av2ts-tiny, trained weights) on every whole ``frames``-second clip of the demo video:
    argmax agreement of the default path with fp32, over all pixels of all clips."""
    from av2ts_cli import media  # local: ffmpeg plumbing, only for this measurement
    from av2ts_cli.avsbench import frame_time
    from av2ts_cli.model.audio import waveform_to_examples
    from av2ts_cli.model.inference import precision_context, prepare_for_inference
    from av2ts_cli.weights.registry import DEMO_MODEL_DIR

    video = DEMO_MODEL_DIR.parent / "demo.mp4"
    model, cfg, _ = resolve_model(str(DEMO_MODEL_DIR))
    precision = cpu_precision()["precision"]
    fast = prepare_for_inference(copy.deepcopy(model), precision, "cpu")
    model.eval()
    info = media.probe(video)
    clips = int(info.duration) // frames
    size = cfg.input_size
    images = media.decode_frames_at(video, [frame_time(k) for k in range(clips * frames)], (size, size))
    examples = waveform_to_examples(torch.from_numpy(media.decode_audio(video)).float(), clips * frames)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float().reshape(clips, frames, 3, size, size)
    audio = examples.reshape(clips, frames, EXAMPLE_FRAMES, MEL_BANDS)
    with torch.inference_mode():
        reference = model.segment(images, audio)
        with precision_context(precision, "cpu"):
            scores = fast.segment(images, audio)
    return {"model": "demo (av2ts-tiny, trained)", "video": video.name, "clips": clips, "frames": clips * frames,
            "input_size": size, "precision": precision, "argmax_agreement": agreement(scores, reference),
            "max_abs_difference": float((scores - reference).abs().max())}


def run_levers(cases: list[tuple[str, int]] | None = None, frames: int = 5, repeats: int = 3,
               compile_backbones: bool = False, threads: int | None = None, demo: bool = True,
               progress=None) -> dict:
    """``time_levers`` for every (preset, input size) case (default ``LEVER_CASES``) and the demo model's agreement."""
    from av2ts_cli.model.inference import cpu_has_native_bf16  # local: as above

    if threads:
        torch.set_num_threads(threads)
    choice = cpu_precision()  # the default path's precision, measured at this thread count
    results = [time_levers(name, size, frames, repeats, compile_backbones, progress=progress)
               for name, size in (cases or LEVER_CASES)]
    return {"deform_attn_backend": active_backend(), "threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16(), "default_precision": choice["precision"],
            "precision_figures": choice["figures"],
            "frames_per_clip": frames, "repeats": repeats, "levers": results,
            "demo": demo_agreement(frames) if demo else None}


def print_levers(report: dict) -> None:
    console.print(f"CPU forward (segment) per clip of {report['frames_per_clip']} frames, {report['threads']} threads, "
                  f"native bf16: {'yes' if report['native_bf16'] else 'no'}, default precision "
                  f"{report['default_precision']} (measured: bf16 "
                  f"{report['precision_figures']['bf16_speedup']}x fp32), "
                  f"deform-attn backend: {report['deform_attn_backend']}; median of "
                  f"{report['repeats']} interleaved runs", highlight=False, soft_wrap=True)
    for case in report["levers"]:
        title = f"{case['preset']}{' + Siam' if case['siam'] else ''}, {case['input_size']} px"
        table = Table(title=title)
        for column in ("step", "ms", "CPU ms", "gain", "x fp32", "argmax = fp32"):
            table.add_column(column, justify="left" if column == "step" else "right")
        for row in case["steps"]:
            mark = " (default)" if row["step"] == case["default_step"] else ""
            table.add_row(row["step"] + mark, f"{row['median_s'] * 1000:.0f}", f"{row['cpu_s'] * 1000:.0f}",
                          "-" if row["lever"] == "-" else f"{row['gain']:.2f}x", f"{row['x_fp32']:.2f}",
                          f"{100 * row['argmax_agreement']:.2f}%")
        console.print(table)
        line = (f"{title}: fp32 eager {case['fp32_median_s'] * 1000:.0f} ms, default path "
                f"{case['default_median_s'] * 1000:.0f} ms: {case['ratio']:.2f}x; argmax agreement "
                f"{100 * case['default_argmax_agreement']:.2f}%")
        if case["compile_s"]:
            line += f"; backbone compile {case['compile_s']:.1f} s (first call, cached for the next process)"
        console.print(line, highlight=False, soft_wrap=True)
    demo = report.get("demo")
    if demo:
        console.print(f"demo model on {demo['video']} ({demo['clips']} clips, {demo['frames']} frames at "
                      f"{demo['input_size']} px), {demo['precision']} vs fp32: argmax agreement "
                      f"{100 * demo['argmax_agreement']:.2f}%, max |difference| {demo['max_abs_difference']:.3g}",
                      highlight=False, soft_wrap=True)
