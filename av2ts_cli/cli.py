"""The av2ts command line (Typer); past 500 lines only in option declarations: each verb's work lives in its module.

Thin: parse options, call the module that does the work, report.

Heavy imports (torch, timm, the model) happen inside the commands so ``--help`` and ``--version`` stay instant.
Every command runs under ``_reported``: a project error becomes one line on stderr and its exit code
(docs/architecture.md, 'Errors and exit codes'); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from av2ts_cli import __version__
from av2ts_cli.console import console, error_line, make_progress, print_json, printable, show_library_messages
from av2ts_cli.console import state as _state
from av2ts_cli.errors import EXIT_FAILURE, Av2tsError, UsageError, describe
from av2ts_cli.interrupts import Interrupted, signum_of, stop_on_signals
from av2ts_cli.sources import collect_videos
from av2ts_cli.training.recipes import recipe_defaults

app = typer.Typer(
    name="av2ts",
    help="Segment the objects that make the sound in a video (AV2TS audio-visual segmentation).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Synthetic AVSBench-format data and dataset checks.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: speed as ratios against a baseline in the same run, peak memory.",
                        no_args_is_help=True)
app.add_typer(data_app, name="data", rich_help_panel="Data")
app.add_typer(bench_app, name="bench", rich_help_panel="Diagnostics")

def _network_error(err: Exception) -> Av2tsError | None:
    """The project error that a failure of the network stands for, or None. The network cannot import ``errors``
    (it stands alone), so it raises ``model.ops.build.KernelError`` for a forced kernel that cannot run (a runtime
    failure, exit 1) and ``ValueError`` for inputs it refuses (tensor shapes, an unknown AV2TS_DEFORM_ATTN: usage,
    exit 2); a ValueError counts as the network's when its innermost frame is in ``av2ts_cli.model``."""
    build = sys.modules.get("av2ts_cli.model.ops.build")  # loaded if a KernelError exists; importing it loads torch
    if build is not None and isinstance(err, build.KernelError):
        return Av2tsError(str(err))
    if isinstance(err, ValueError) and err.__traceback__ is not None:
        frame = err.__traceback__
        while frame.tb_next is not None:
            frame = frame.tb_next
        if frame.tb_frame.f_globals.get("__name__", "").startswith("av2ts_cli.model."):
            return UsageError(str(err))
    return None


def _option_values(func, kwargs: dict) -> dict:
    """Flag -> value of the command's options ("--out" -> Path("x")), read from its Typer declarations (in
    ``Annotated`` or as the default): the error lines name a path by its option (``--out existing.txt is a file,
    not a folder``)."""
    import inspect  # local: only when a command failed
    import typing

    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # an annotation that does not evaluate: the defaults still declare options
        hints = {}
    flags = {}
    for name, parameter in inspect.signature(func).parameters.items():
        declared = [*getattr(hints.get(name), "__metadata__", ()), parameter.default]
        info = next((d for d in declared if isinstance(d, typer.models.OptionInfo)), None)
        if info is not None and name in kwargs:
            decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
            flag = decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
            flags[flag] = kwargs[name]
    return flags


def _bug_line(err: Exception) -> str:
    """One line for an exception no rule describes (a bug): its class and message, whitespace joined; from a
    DataLoader worker (torch's text holds the whole worker traceback) the original exception's last line."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        import re  # local: only for a bug in a worker

        lines = text.splitlines()
        heads = [i for i, line in enumerate(lines) if re.match(r"(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*: ", line)]
        original = " ".join(" ".join(lines[heads[-1] if heads else -1:]).split())  # "Type: message", one line
        return f"{original} (in a data-loading worker)"
    return f"{type(err).__name__}: {' '.join(text.split())}"


def _reported(func):
    """Turn project errors, OSErrors and running out of memory into one line and an exit code (the path and the
    problem in words: ``errors.describe``); ``--debug`` re-raises them with a traceback. The network's warnings
    and notices are shown as the console's lines while the command runs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        show_library_messages()
        _state["json_printed"] = False
        try:
            with stop_on_signals():  # SIGINT and SIGTERM alike in every command: cleanup, one line, 130 / 143
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as stop:  # a command without its own words for it: the finally blocks cleaned up
            err = Interrupted(signum_of(stop), "stopped; what it was writing was removed")
            error_line(err.message)
            if kwargs.get("as_json") and not _state["json_printed"]:
                print_json({"error": err.message, "exit_code": err.exit_code})
            raise typer.Exit(err.exit_code) from None
        except Exception as err:
            if _state["debug"]:
                raise
            project = _network_error(err)
            line = project.message if project is not None else describe(err, options=_option_values(func, kwargs))
            if line is not None:
                code = project.exit_code if project is not None else getattr(err, "exit_code", EXIT_FAILURE)
            else:  # a bug: still one line, the traceback behind --debug
                line, code = f"{_bug_line(err)} (run with --debug for the traceback)", EXIT_FAILURE
            error_line(line)
            if kwargs.get("as_json") and not _state["json_printed"]:  # --json: the failure as JSON on stdout too
                print_json({"error": printable(line), "exit_code": code})
            raise typer.Exit(code) from None

    return wrapper


# model.inference.PRECISIONS (a test keeps them equal): spelled here so that a wrong value fails before torch loads
_PRECISIONS = ("fp32", "bf16", "fp16")
_PRECISION_HELP = ("fp32, bf16 or fp16 (CUDA only). Default: on a CPU the faster of fp32 and bf16 as measured "
                   "once on this machine (av2ts info shows the figures; bf16: the whole forward in bf16), fp32 on "
                   "CUDA.")


def _check_precision(value: str | None) -> str | None:
    """--precision: UsageError for a value other than fp32, bf16 and fp16."""
    if value is not None and value not in _PRECISIONS:
        raise UsageError(f"--precision {value!r} is not one of {', '.join(_PRECISIONS)}")
    return value


def _frame_size(text: str) -> tuple[int, int]:
    """"WxH" -> (W, H), both at least 32 (a UsageError naming the value otherwise)."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or min(int(width), int(height)) < 32:
        raise UsageError(f"--size {text}: expected WxH in pixels, each at least 32 (e.g. 1280x720)")
    return int(width), int(height)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"av2ts {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


# ------------------------------------------------------------------------------------------------ segment videos
class _OptionalValueCommand(TyperCommand):
    """A command whose ``optional_value`` options may come with or without a value (``--overlay`` or
    ``--overlay PATH``): Typer's parser has no such options, so a bare one is given the empty value here. As in
    Click, the next argument is the value unless it looks like an option."""

    optional_value = ("--overlay",)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        fixed = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            following = args[i + 1] if i + 1 < len(args) else None
            if arg in self.optional_value and (following is None or (following.startswith("-") and following != "-")):
                fixed[i] = f"{arg}="
        return super().parse_args(ctx, fixed)


@app.command(cls=_OptionalValueCommand, rich_help_panel="Segment videos")
@_reported
def predict(
    sources: Annotated[list[str], typer.Argument(help="Video files, folders (every video inside) or glob patterns.",
                                                 show_default=False)],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also search the subfolders of folders.",
                                            rich_help_panel="Input")] = False,
    fps: Annotated[int, typer.Option("--fps", min=1, help="Masks per second: F passes, each shifting frames and audio "
                                     "windows by 1/F s.", rich_help_panel="Input")] = 1,
    maskiges: Annotated[str | None, typer.Option("--maskiges", metavar="auto|DIR", help="Models with the Siam "
                                                 "encoder: auto (default) makes them with --generator and caches "
                                                 "them in OUT/<video>/maskiges/; DIR reads DIR/<video>/NNNNNN.png, "
                                                 "numbered like the masks.", rich_help_panel="Input",
                                                 show_default=False)] = None,
    generator: Annotated[str | None, typer.Option("--generator", "-g", help="--maskiges auto: hf://owner/repo"
                                                  "\\[@rev] or a save_pretrained folder (default: SAM ViT-B, "
                                                  "pinned).", rich_help_panel="Input")] = None,
    points_per_side: Annotated[int | None, typer.Option("--points-per-side", min=1, help="--maskiges auto: the "
                                                        "generator's point grid side (default 32).",
                                                        rich_help_panel="Input")] = None,
    require_audio: Annotated[bool, typer.Option("--require-audio", help="Fail a video without an audio stream "
                                                "(default: silence and a warning).", rich_help_panel="Input")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint folder, hf://owner/repo\\[@rev]"
                                              "\\[/dir] or registry name (default: the bundled demo model).",
                                              rich_help_panel="Model")] = None,
    window: Annotated[int | None, typer.Option("--window", "-t", min=1, help="Seconds per clip, T (default: the "
                                               "model's).", rich_help_panel="Model")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Sounding-object probability "
                                             "threshold of binary (S4/MS3) models; semantic models take the argmax.",
                                             rich_help_panel="Model")] = 0.5,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: runs/predict/exp, exp2, "
                                             "...). Re-running into it skips finished videos.",
                                             rich_help_panel="Output")] = None,
    formats: Annotated[str, typer.Option("--format", help="Comma-separated: png (masks/NNNNNN.png), json "
                                         "(frames.jsonl), rle (masks.coco.json, COCO RLE), preview (preview.jpg: "
                                         "up to 16 frames with their masks).",
                                         rich_help_panel="Output")] = "png,json,rle,preview",
    overlay: Annotated[str | None, typer.Option("--overlay", metavar="[PATH]", help="Also write an overlay video with "
                                                "the audio: OUT/<video>/overlay.mp4, or PATH (a folder for several "
                                                "videos).", rich_help_panel="Output", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo videos that are already done.",
                                        rich_help_panel="Output")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.",
                                        rich_help_panel="Performance")] = "auto",
    precision: Annotated[str | None, typer.Option("--precision", metavar="fp32|bf16|fp16", help=_PRECISION_HELP,
                                                  rich_help_panel="Performance", show_default=False)] = None,
    half: Annotated[bool, typer.Option("--half", help="The fast path: fp16 on CUDA, bf16 on CPUs where it measured "
                                       "faster than fp32.", rich_help_panel="Performance")] = False,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, help="Windows per forward pass.",
                                       rich_help_panel="Performance")] = 1,
) -> None:
    """Segment the sounding objects of videos: masks, per-frame JSON, COCO RLE and overlays."""
    # "no such file" before torch loads: 1.1-1.4 s and 37 MB, was 23-28 s and 835 MB (the busy 2-core machine)
    _check_precision(precision)
    videos = collect_videos(sources, recursive)  # once, here: the run takes this list
    from av2ts_cli import predict as predictor  # local: start-up: predict imports torch and the network
    from av2ts_cli.errors import EXIT_PARTIAL

    options = predictor.PredictOptions(
        model=model, out=out, fps=fps, window=window, device=device, half=half, precision=precision, batch=batch,
        recursive=recursive,
        threshold=threshold, formats=predictor.parse_formats(formats), maskiges=maskiges, generator=generator,
        generator_settings={} if points_per_side is None else {"points_per_side": points_per_side},
        overlay=overlay, force=force, require_audio=require_audio)
    report = predictor.run(videos, options)
    if report.rank == 0:  # torchrun: rank 0 reports for every process; every process exits alike
        predictor.print_report(report)
    if report.failures:
        raise typer.Exit(EXIT_PARTIAL)


@app.command(rich_help_panel="Segment videos")
@_reported
def overlay(
    video: Annotated[Path, typer.Argument(help="The video the masks were made from.", show_default=False)],
    masks_dir: Annotated[Path, typer.Argument(help="Its masks folder (times from frames.jsonl beside it, else one "
                                              "mask per second in file-name order).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The overlay video to write (.mp4).",
                                      show_default=False)],
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Opacity of the mask colour.")] = 0.5,
    contour: Annotated[bool, typer.Option("--contour", help="Also draw the mask outlines, opaque.")] = False,
    palette: Annotated[str, typer.Option("--palette", help="auto (from the mask files), binary (one highlight "
                                         "colour) or avss (AVSBench class colours).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out that av2ts did not write.")
                     ] = False,
) -> None:
    """Paint masks on a video (each frame gets the mask of the nearest sampled time), with the original audio."""
    from av2ts_cli import render  # local: cv2 and PIL (0.7 s); `--help` must not wait for them

    report = render.overlay_command(video, masks_dir, out, force=force, alpha=alpha, contour=contour,
                                    palette=palette)
    sound = "with the original audio" if report["audio"] else "no audio in the input"
    console.print(f"Overlay saved to {report['output']} ({report['frames']} frames, {report['duration']:.2f} s, "
                  f"{sound})", markup=False, highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Data")
@_reported
def maskiges(
    sources: Annotated[list[str] | None, typer.Argument(help="Videos, folders or globs (with --out); none for a "
                                                        "dataset (--subset, --data).", show_default=False)] = None,
    subset: Annotated[str | None, typer.Option("--subset", help="s4, ms3 or avss: the dataset form.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The dataset root or the subset's folder; maskiges go "
                                              "to its pre_SAM_mask/.")] = None,
    masks_from: Annotated[Path | None, typer.Option("--masks-from", help="COMBO's step-1 masks (<frame>_mask.npy "
                                                    "mirroring the frame folders) instead of a generator.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Videos: DIR/<video>/NNNNNN.png, what predict "
                                             "--maskiges DIR reads.")] = None,
    fps: Annotated[int, typer.Option("--fps", min=1, help="Videos: masks per second, as predict's --fps.")] = 1,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Videos: also search subfolders.")] = False,
    geometry: Annotated[str | None, typer.Option("--geometry", metavar="square-224|source-224|source-384",
                                                 help="The maskiges' geometry, as the model trained on: "
                                                 "square-224 (videos' default; COMBO and AV2TS on S4 or MS3: the frame "
                                                 "squashed to 224x224), source-224 (AVSS), source-384 (VCT; a "
                                                 "dataset's go to its 384 layout).")] = None,
    generator: Annotated[str | None, typer.Option("--generator", "-g", help="hf://owner/repo\\[@rev] or a "
                                                  "save_pretrained folder (default: SAM ViT-B, pinned).")] = None,
    points_per_side: Annotated[int | None, typer.Option("--points-per-side", min=1, help="Point grid side "
                                                        "(default 32).")] = None,
    points_per_batch: Annotated[int | None, typer.Option("--points-per-batch", min=1, help="Points per decoder "
                                                         "call: memory vs speed (default 64).")] = None,
    pred_iou_thresh: Annotated[float | None, typer.Option("--pred-iou-thresh", min=0.0, max=1.0, help="Predicted-"
                                                          "IoU threshold (default 0.88).")] = None,
    stability_thresh: Annotated[float | None, typer.Option("--stability-thresh", min=0.0, max=1.0, help="Stability "
                                                           "score threshold (default 0.92).")] = None,
    box_nms_thresh: Annotated[float | None, typer.Option("--box-nms-thresh", min=0.0, max=1.0, help="Box NMS IoU "
                                                         "(default 0.7).")] = None,
    min_region: Annotated[int | None, typer.Option("--min-region", min=0, help="Remove holes and islands under N "
                                                   "px (default 10; 0 off).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per "
                                        "process).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Remake maskiges that exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Make maskiges for the Siam encoder (COMBO's recipe) from SAM masks or --masks-from: a dataset or videos."""
    # local: the maskiges package (and transformers behind it) only loads for this command
    from av2ts_cli.maskiges.command import run_command

    settings = {k: v for k, v in (("points_per_side", points_per_side), ("points_per_batch", points_per_batch),
                                  ("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_thresh),
                                  ("box_nms_thresh", box_nms_thresh), ("min_region", min_region)) if v is not None}
    code = run_command(sources, subset=subset, data=data, masks_from=masks_from, out=out, fps=fps, geometry=geometry,
                       generator=generator, settings=settings, device=device, force=force, recursive=recursive,
                       as_json=as_json)
    if code:
        raise typer.Exit(code)


# --------------------------------------------------------------------------------------------------- diagnostics
@app.command(rich_help_panel="Diagnostics")
@_reported
def info(
    model: Annotated[str | None, typer.Option("--model", "-m",
                                              help="A preset or checkpoint: print its parameters per part.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Versions, devices, ffmpeg, deformable-attention backend and caches (or a model's parameter counts)."""
    from av2ts_cli import environment  # local: loads numpy, rich tables and the checkpoint code: not for --help

    if model is not None:
        report = environment.model_report(model)
        print_json(report) if as_json else environment.print_model_report(report)
        registry = report.get("registry")
        if registry and not as_json:  # a registry name: where it comes from, its published scores, its licence
            published = registry.get("published") or {}
            scores = ", ".join(f"{k} {v}" for k, v in published.items() if k != "subset")
            console.print(f"{registry['description']}\nsource: {registry['source']}" +
                          (f"; published ({published.get('subset')}): {scores}" if scores else "") +
                          (f"; licence: {registry['licence']}" if registry.get("licence") else ""),
                          highlight=False, soft_wrap=True)
        return
    report = environment.environment_report()
    print_json(report) if as_json else environment.print_environment_report(report)


# -------------------------------------------------------------------------------------------------------- models
@app.command(rich_help_panel="Models")
@_reported
def convert(
    source: Annotated[str, typer.Argument(help="Upstream weights: a .pth/.pt/.pkl/.safetensors file or hf://owner/repo.")],
    kind: Annotated[str, typer.Option("--kind", "-k", help="reference (full AV2TS checkpoint of the reference code), "
                                      "detectron2 (R-50.pkl / d2_pvt_v2_b5.pkl), ced (CED-Mini .pt), ced-hf "
                                      "(hf://mispeech/ced-mini safetensors), combo (checkpoint of the COMBO-AVS "
                                      "code), vggish (vggish-10086976.pth, into a combo-* model), avsegformer "
                                      "(a checkpoint of the AVSegFormer code) or vct (one of the VCT code).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write (model.safetensors + "
                                      "config.json).")],
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="Model preset for a partial import "
                                               "(default: inferred from the file, else av2ts-r50).")] = None,
    subset: Annotated[str | None, typer.Option("--subset", help="s4, ms3 or avss (default: from the file's classes, "
                                               "else s4).")] = None,
    siam: Annotated[bool | None, typer.Option("--siam/--no-siam", help="With or without the Siam encoder (default: "
                                              "from the file, else the preset's).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Apply a partial import to this checkpoint instead of a "
                                             "fresh model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Import upstream weights into an av2ts checkpoint (torch weights_only / safetensors / numpy-only pickles)."""
    from av2ts_cli.weights import convert as converter  # local: the importers and torch: not for --help

    report = converter.convert_to_checkpoint(source, kind, out, preset=preset, subset=subset, siam=siam, base=base)
    print_json(report) if as_json else converter.print_conversion_report(report)


@app.command(rich_help_panel="Models")
@_reported
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """List every model name av2ts can fetch: family, backbone, subset, published J/F, parameters, licence, cached."""
    from av2ts_cli.weights import zoo  # local: the registry's caches and, once, the parameter counts (torch)

    listing = zoo.list_models()
    print_json({"models": listing}) if as_json else zoo.print_models(listing)


@app.command(rich_help_panel="Models")
@_reported
def download(
    names: Annotated[list[str], typer.Argument(help="Registry models (combo-r50-s4, combo-pvt-s4, vct-s4, vct-ms3, "
                                               "vct-avss, avsegformer-{pvt,r50}-{s4,ms3,avss}, ced-mini), vggish "
                                               "or sam-vit-base (the maskige generator).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Fetch models into the caches ahead (an offline machine, a cluster node); upstream checkpoints are converted."""
    from av2ts_cli import download as downloader  # local: huggingface_hub and the converters: only this command

    show = None if as_json else (lambda result: console.print(downloader.describe(result), highlight=False,
                                                               soft_wrap=True))
    results = downloader.download(names, on_done=show)
    if as_json:
        print_json({"downloads": results})


# ----------------------------------------------------------------------------------------------- data and eval
_SUBSET_HELP = "s4 (Single-source), ms3 (Multi-sources) or avss (AVSBench-semantic)."
_DATA_HELP = "The dataset root (AVS_dataset/ with AVSBench_object/ and AVSBench_semantic/) or the subset's folder."


@app.command("eval", rich_help_panel="Training and evaluation")
@_reported
def eval_command(
    subset: Annotated[str, typer.Option("--subset", help=_SUBSET_HELP)],
    data: Annotated[Path, typer.Option("--data", help=_DATA_HELP)],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint folder, "
                                              "hf://owner/repo\\[@rev]\\[/dir] or registry name to run.")] = None,
    pred_dir: Annotated[Path | None, typer.Option("--pred-dir", help="Score saved predictions instead: one PNG per "
                                                  "labelled frame at the label's path relative to the split.")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    protocol: Annotated[str, typer.Option("--protocol", help="av2ts (F-score per video as COMBO/AV2TS, AVSS real "
                                          "frames only), avsbench (F-score per 4 videos in CSV order, AVSS v1 clips "
                                          "padded to 10 frames) or avsegformer (AVSegFormer's own: S4/MS3 at "
                                          "512x512 against labels upsampled from 224, F-score per 2 videos, AVSS "
                                          "padded).")] = "av2ts",
    save_pred: Annotated[Path | None, typer.Option("--save-pred", help="Also write the model's predictions there "
                                                   "(the --pred-dir format).")] = None,
    shuffle_audio: Annotated[bool, typer.Option("--shuffle-audio", help="Give each clip another clip's audio (a "
                                                "fixed derangement): a control for audio use.")] = False,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, help="Clips per forward pass.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str | None, typer.Option("--precision", metavar="fp32|bf16|fp16", help=_PRECISION_HELP,
                                                  show_default=False)] = None,
    half: Annotated[bool, typer.Option("--half", help="The fast path: fp16 on CUDA, bf16 on CPUs where it measured "
                                       "faster than fp32.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --shuffle-audio pairing.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Official AVSBench metrics (mIoU, F-score) of a model or of saved predictions."""
    _check_precision(precision)
    from av2ts_cli import evaluate  # local: imports torch (seconds); `--help` must not wait for it

    report = evaluate.evaluate(subset, data, split=split, protocol=protocol, model=model, pred_dir=pred_dir,
                               save_pred=save_pred, shuffle_audio=shuffle_audio, batch=batch, device=device,
                               workers=workers, seed=seed, progress=not as_json, precision=precision, half=half)
    if report["rank"] != 0:  # torchrun: rank 0 reports for every process
        return
    if as_json:
        print_json({k: report[k] for k in ("subset", "split", "protocol", "videos", "frames", "miou", "fscore",
                                            "metrics_file", "processes")})
    else:
        evaluate.print_report(report)
    if report["save_error"]:  # after the metrics: a metrics.json that cannot be written does not lose them
        raise Av2tsError(report["save_error"])


@app.command("plot", rich_help_panel="Training and evaluation")
@_reported
def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of av2ts train (or their log.csv); several are "
                                               "drawn together, one colour each.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The picture: .png, .pdf, .svg or .jpg (default: "
                                             "RUN/results.png for one run, a new runs/plot/expN/compare.png for "
                                             "several).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a file av2ts did not write.")] = False,
) -> None:
    """Draw training curves from log.csv: each loss group, the learning rate, val mIoU and F against iteration."""
    from av2ts_cli import plots  # local: numpy and Pillow; matplotlib itself only when it draws

    path = plots.plot_runs(runs, out, force=force)
    console.print(f"Results saved to {path}", markup=False)


@data_app.command("synth")
@_reported
def data_synth(
    subset: Annotated[str, typer.Option("--subset", help=_SUBSET_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset root to write into (the subset goes to its "
                                      "official folder inside).")],
    videos: Annotated[int | None, typer.Option("--videos", "-n", min=0, help="Training videos (default: s4 48, ms3 "
                                               "32, avss 36).")] = None,
    val: Annotated[int | None, typer.Option("--val", min=0, help="Validation videos (default: a quarter of "
                                            "--videos, at least 2).")] = None,
    test: Annotated[int | None, typer.Option("--test", min=0, help="Test videos (default: as --val).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes.")] = 0,
    categories: Annotated[int, typer.Option("--categories", min=2, max=6, help="Sounding-shape categories used "
                                            "(the first N of 6; fewer is easier).")] = 6,
    size: Annotated[int, typer.Option("--size", min=32, help="Frame side in pixels.")] = 224,
    maskiges: Annotated[bool, typer.Option("--maskiges/--no-maskiges", help="Also write the Siam encoder's "
                                           "maskiges (pre_SAM_mask).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace the subset's folder if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Write synthetic "sounding shapes" data in the official AVSBench layout (seeded, deterministic)."""
    from av2ts_cli.data import synth  # local: imports torch (seconds); `--help` must not wait for it

    counts = {k: v for k, v in (("train", videos), ("val", val), ("test", test)) if v is not None}
    options = synth.SynthOptions(subset, counts=counts, seed=seed, categories=categories, size=size,
                                 maskiges=maskiges)
    with make_progress(transient=True) as progress:
        task = progress.add_task("writing videos", total=sum(options.counts.values()))
        report = synth.synthesize(out, options, force=force, on_video=lambda *_: progress.advance(task))
    if as_json:
        print_json(report)
    else:
        splits = ", ".join(f"{split} {n}" for split, n in report["splits"].items())
        console.print(f"Wrote synthetic {subset.upper()} ({splits} videos, {report['frames']} frames, "
                      f"{report['masks']} masks) to {report['root']}")


@data_app.command("clip")
@_reported
def data_clip(
    out: Annotated[Path, typer.Argument(help="The MP4 to write; its known masks go to <stem>-masks/ beside it.")],
    kind: Annotated[str, typer.Option("--kind", help="s4: one object sounds throughout; ms3: the sounding objects "
                                      "change each second.")] = "s4",
    seconds: Annotated[int, typer.Option("--seconds", min=1, help="Length in seconds.")] = 15,
    size: Annotated[int, typer.Option("--size", min=32, help="Frame side in pixels.")] = 256,
    fps: Annotated[float, typer.Option("--fps", help="Video frame rate.")] = 25.0,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same clip.")] = 0,
    categories: Annotated[int, typer.Option("--categories", min=2, max=6, help="Sounding-shape categories used "
                                            "(the first N of 6).")] = 6,
    force: Annotated[bool, typer.Option("--force", help="Replace the clip and its masks if they exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Write one synthetic "sounding shapes" video with sound and its known masks (a clip to try predict on)."""
    from av2ts_cli.data import synth  # local: imports torch (seconds); `--help` must not wait for it

    report = synth.write_clip(out, kind=kind, seconds=seconds, size=size, fps=fps, seed=seed, categories=categories,
                              force=force)
    if as_json:
        print_json(report)
    else:
        console.print(f"Wrote {report['video']} ({seconds} s, {size}x{size}, {report['fps']:g} fps, with sound) and "
                      f"its known masks in {report['masks']}")


@data_app.command("check")
@_reported
def data_check(
    subset: Annotated[str, typer.Option("--subset", help=_SUBSET_HELP)],
    data: Annotated[Path, typer.Option("--data", help=_DATA_HELP)],
    layout: Annotated[str, typer.Option("--layout", help="standard (what AV2TS, COMBO and AVSegFormer read) or 384 "
                                        "(what VCT reads: its 384 px folders where they exist).")] = "standard",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Counts per split and every missing, unreadable or mis-sized file; exit 1 if there is any."""
    from av2ts_cli.data import check  # local: imports torch (seconds, through data.audio); `--help` must not wait
    from av2ts_cli.data.layout import FORMS, check_subset  # local: numpy (through classes), not for `--help`

    check_subset(subset)
    if layout not in FORMS:
        raise UsageError(f"--layout {layout}: choose from {', '.join(FORMS)}")
    with make_progress(transient=True) as progress:
        task = progress.add_task("checking videos", total=check.total_videos(data, subset))
        report = check.check_dataset(data, subset, on_video=lambda: progress.advance(task), layout=layout)
    print_json(report) if as_json else check.print_report(report)
    if report["problems"]:
        raise typer.Exit(EXIT_FAILURE)


@app.command("train", rich_help_panel="Training and evaluation")
@_reported
def train_command(
    subset: Annotated[str | None, typer.Option("--subset", help="s4, ms3 or avss (not needed with --resume).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The dataset root or the subset's folder (not needed "
                                              "with --resume).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="A preset (random init; default av2ts-r50) or a "
                                              "checkpoint to start from, e.g. converted backbones.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Iterations (default: the preset's recipe: "
                                              f"{recipe_defaults('iters')}).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", "-b", help="Clips per iteration, all processes together "
                                              f"(default: the recipe's: {recipe_defaults('batch')}).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Base learning rate (poly schedule; "
                                             "AVSegFormer's is constant) (default: "
                                             f"{recipe_defaults('lr')}).")] = None,
    backbone_lr_mult: Annotated[float | None, typer.Option("--backbone-lr-mult", help="LR factor of the visual "
                                                           "backbone and Siam encoder (default: "
                                                           f"{recipe_defaults('backbone_lr_mult')}).")] = None,
    clip_norm: Annotated[float | None, typer.Option("--clip-norm", help="Clip the L2 norm of all gradients "
                                                    "together; 0: off (default: "
                                                    f"{recipe_defaults('clip_norm')}).")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="fp16 autocast with a grad scaler, CUDA only "
                                             f"(default on CUDA: {recipe_defaults('amp')}).")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16", help="bf16 autocast (CPU or CUDA).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/train/exp, exp2, ...).")
                   ] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue a run: its folder or its last/ "
                                                "checkpoint.")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Evaluate and save every N iterations, and "
                                                   "at the end; 0: only at the end (default: "
                                                   f"{recipe_defaults('eval_every')}).")] = None,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help="Split that picks the best checkpoint "
                                                   "(default val; the reference AV2TS used test).")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="The reference's random resize, "
                                                 "crop and flip per clip, colour jitter per image (default: "
                                                 f"{recipe_defaults('augment')}).")] = None,
    ignore_padding: Annotated[bool | None, typer.Option("--ignore-padding/--no-ignore-padding", help="Pixels "
                                                        "labelled 255 (the padding after a random resize below the "
                                                        "input size) weigh 0 in the matcher and mask losses; off: "
                                                        "they are negatives of every class, as in the reference "
                                                        f"(default: {recipe_defaults('ignore_padding')}).")] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="Write a log.csv row every N iterations "
                                                  "(default 20).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Data-loading processes (default 2).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the initialisation, data order and "
                                             "augmentation (default 0).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default auto).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")] = False,
) -> None:
    """Train a model: checkpoints last/ and best/ (by val mIoU), resumable bit for bit, torchrun for several processes.

    AdamW with each family's reference recipe. SIGINT/SIGTERM save last/ and exit 130/143.
    """
    from av2ts_cli import training  # local: the trainer imports torch (seconds); `--help` must not wait for it

    report = training.train(resume=resume, progress=not as_json, subset=subset, data=data, model=model,
                            iters=iters, batch=batch, lr=lr, backbone_lr_mult=backbone_lr_mult, clip_norm=clip_norm,
                            amp=amp, bf16=bf16, out=None if out is None else str(out), eval_every=eval_every,
                            eval_split=eval_split, augment=augment, ignore_padding=ignore_padding,
                            log_every=log_every, workers=workers, seed=seed, device=device)
    if report is None:  # a process other than rank 0 of a torchrun job
        return
    print_json(report) if as_json else training.print_report(report)


def _check_bench_cases(presets: list[str] | None, size: int | None) -> None:
    """--preset names and --size of the model benchmarks: UsageError for what cannot run."""
    from av2ts_cli.config import PRESET_NAMES  # local: start-up: config is read only by the bench commands

    if size is not None and size % 32:
        raise UsageError(f"--size {size} is not a multiple of 32")
    for name in presets or []:
        if name not in PRESET_NAMES:
            raise UsageError(f"unknown model preset {name!r}; choose from {', '.join(PRESET_NAMES)}")


@bench_app.command("train")
@_reported
def bench_train(
    preset: Annotated[list[str] | None, typer.Option("--preset", "-p", help="Preset to time, repeatable (default: "
                                                     "av2ts-tiny with 4 clips, av2ts-r50 with 1 clip).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", "-b", min=1, help="Clips per step for every --preset.")
                     ] = None,
    size: Annotated[int | None, typer.Option("--size", help="Input side for every --preset (multiple of 32).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per case (median).")] = 5,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="av2ts-tiny, 1 clip at 64 px, 2 steps: a smoke run.")
                     ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Training steps per second and peak memory on CPU, against the pure-PyTorch deform-attn step."""
    from av2ts_cli.bench import train as bench  # local: start-up: benchmarks import torch and the network

    _check_bench_cases(preset, size)
    warmup = 2
    if quick:
        cases, steps, warmup = bench.QUICK_CASES, min(steps, 2), 1
    elif preset:
        cases = [(name, batch or 1, size) for name in preset]
    else:
        cases = [(name, batch or default, size) for name, default, _ in bench.DEFAULT_CASES]
    with make_progress(transient=True) as progress:
        task = progress.add_task("timing", total=None)
        report = bench.run(cases, steps=steps, warmup=warmup, threads=threads,
                           progress=lambda text: progress.update(task, description=text))
    print_json(report) if as_json else bench.print_report(report)


@bench_app.command("model")
@_reported
def bench_model(
    preset: Annotated[list[str] | None, typer.Option("--preset", "-p", help="Preset to time, repeatable "
                      "(default: av2ts-r50 and combo-r50 at 224, av2ts-tiny at 224 and at its own input size).")
                      ] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Preset or checkpoint to time, "
                     "repeatable; av2ts-r50 is timed beside it in the same run.")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Input side for every --preset and --model (multiple "
                                             "of 32).")] = None,
    frames: Annotated[int, typer.Option("--frames", "-t", min=1, help="Frames per clip (T).")] = 5,
    repeats: Annotated[int | None, typer.Option("--repeats", "-r", min=1, help="Timed runs per case (median; "
                                                "default 3 with the levers, 5 per part).")] = None,
    levers: Annotated[bool | None, typer.Option("--levers/--parts", help="The inference levers one by one against "
                                                "fp32 eager (default without --preset/--model; on av2ts-r50 and "
                                                "av2ts-pvt unless --preset), or the time of each part.",
                                                show_default=False)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="--levers: also time torch.compile of the backbones "
                                           "(compile time reported; cached).")] = False,
    demo: Annotated[bool, typer.Option("--demo/--no-demo", help="--levers: also the default path's argmax "
                                       "agreement on the bundled demo model and video.")] = True,
    bf16: Annotated[bool, typer.Option("--bf16", help="--parts: the bf16 default path (weights bf16, BatchNorm "
                                       "folded, channels_last) instead of fp32.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """CPU forward time per clip: the inference levers against fp32 eager, or per part against a ResNet-50."""
    from av2ts_cli.bench import model as bench  # local: start-up: benchmarks import torch and the network

    _check_bench_cases(preset, size)
    if levers or (levers is None and not preset and not model):
        if model:
            raise UsageError("--levers times presets (random weights): give --preset, not --model")
        lever_cases = [(name, size or 224) for name in preset] if preset else None
        if size is not None and not preset:
            lever_cases = [(name, size) for name, _ in bench.LEVER_CASES]
        with make_progress(transient=True) as progress:
            task = progress.add_task("timing", total=None)
            report = bench.run_levers(lever_cases, frames=frames, repeats=repeats or 3, compile_backbones=compile_,
                                      threads=threads, demo=demo,
                                      progress=lambda text: progress.update(task, description=text))
        print_json(report) if as_json else bench.print_levers(report)
        return
    cases = [(name, size) for name in preset or []]
    if model:
        reference = (bench.REFERENCE_CASE[0], size or bench.REFERENCE_CASE[1])
        cases += [reference] if reference not in cases and bench.REFERENCE_CASE[0] not in model else []
        cases += [(name, size) for name in model]
    if not cases:
        cases = [("av2ts-r50", 224), ("combo-r50", 224), ("av2ts-tiny", 224), ("av2ts-tiny", None)]
    report = bench.run(cases, frames=frames, repeats=repeats or 5, bf16=bf16, threads=threads)
    print_json(report) if as_json else bench.print_report(report)


@bench_app.command("kernels")
@_reported
def bench_kernels(
    size: Annotated[list[int] | None, typer.Option("--size", "-s", min=32, help="Input side, repeatable "
                                                   "(default: 224 and 512).")] = None,
    frames: Annotated[int, typer.Option("--frames", "-t", min=1, help="Frames per clip (T, the batch).")] = 5,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=1, help="Timed forward runs per implementation "
                                         "(median; half as many forward+backward).")] = 15,
    device: Annotated[str, typer.Option("--device", help="cpu (the C++ kernel) or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="64 px, T=1, 3 runs: a smoke run.")] = False,
    peer: Annotated[bool, typer.Option("--peer", help="Also time the peer package torch-ms-deform-attn (installed "
                                       "separately) in the same run, its outputs checked equal.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Deformable-attention kernel vs the pure-PyTorch fallback at the pixel decoder's shapes: speed-ups, memory."""
    from av2ts_cli.bench import kernels as bench  # local: start-up: benchmarks import torch and the network

    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: expected cpu or cuda")
    if quick:
        size, frames, repeats = [64], 1, 3
    with make_progress(transient=True) as progress:
        task = progress.add_task("timing", total=None)
        report = bench.run(tuple(size or bench.DEFAULT_SIZES), frames=frames, repeats=repeats, device=device,
                           threads=threads, progress=lambda text: progress.update(task, description=text),
                           peer=peer)
    print_json(report) if as_json else bench.print_report(report)


@bench_app.command("media")
@_reported
def bench_media(
    quick: Annotated[bool, typer.Option("--quick", help="Small clips (2 s and 6 s at 640x360): a smoke run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Decode throughput and peak memory on 1080p clips of 10 s and 120 s (1 frame/s to 224x224), encode speed."""
    from av2ts_cli.bench import media as bench  # local: start-up: the media benchmark imports numpy and ffmpeg

    options = {"durations": (2, 6), "size": (640, 360), "encode_frames": 20} if quick else {}
    report = bench.run(progress=not as_json, **options)
    print_json(report) if as_json else bench.print_report(report)


@bench_app.command("predict")
@_reported
def bench_predict(
    quick: Annotated[bool, typer.Option("--quick", help="Small clips and the tiny preset: a smoke run.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """av2ts predict on CPU: windows/s and time outside the network (r50, 60 s 720p), peak RSS 30 s vs 10 min."""
    from av2ts_cli.bench import predict as bench  # local: start-up: benchmarks import torch and the network

    report = bench.run(quick=quick, threads=threads, progress=not as_json)
    print_json(report) if as_json else bench.print_report(report)


@bench_app.command("maskiges")
@_reported
def bench_maskiges(
    generator: Annotated[list[str] | None, typer.Option("--generator", "-g", help="hf://owner/repo\\[@rev] or a "
                                                        "save_pretrained folder (SAM, SAM-HQ, SAM 2), repeatable "
                                                        "(default: SAM ViT-B, pinned).")] = None,
    points: Annotated[list[int] | None, typer.Option("--points-per-side", min=1, help="Point grid side, "
                                                     "repeatable (default: 32 and 16).")] = None,
    frames: Annotated[int, typer.Option("--frames", min=1, help="Timed frames per setting (median).")] = 3,
    device: Annotated[list[str] | None, typer.Option("--device", help="cpu or cuda, repeatable (default: cpu, and "
                                                     "cuda where available).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    size: Annotated[list[str] | None, typer.Option("--size", help="Frame size WxH, repeatable (default: 224x224, "
                                                   "the S4/MS3 maskige geometry, and 1280x720).")] = None,
    precision: Annotated[list[str] | None, typer.Option("--precision", help="fp32, bf16 or fp16, repeatable "
                                                        "(default: fp32 and the one auto picks here, if "
                                                        "another).")] = None,
    keep_all: Annotated[bool, typer.Option("--keep-all", help="IoU and stability thresholds 0: every mask is "
                                           "post-processed (the worst case).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="1 frame at 320x180, 1 encoder run: a smoke run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Maskige masks: seconds per frame at 32 and 16 points per side, as a ratio to one image-encoder forward."""
    from av2ts_cli.bench import maskiges as bench  # local: start-up: benchmarks import torch and transformers

    sizes = tuple(_frame_size(text) for text in size) if size else None
    for name in precision or ():
        _check_precision(name)
    options = {"frames": 1, "sizes": (bench.QUICK_SIZE,), "repeats": 1} if quick else {"frames": frames}
    if sizes:
        options["sizes"] = sizes
    settings = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0} if keep_all else None
    with make_progress(transient=True) as progress:
        task = progress.add_task("timing", total=None)
        options.update(points=tuple(points or bench.DEFAULT_POINTS), devices=tuple(device) if device else None,
                       precisions=tuple(precision) if precision else None, threads=threads, settings=settings,
                       progress=lambda text: progress.update(task, description=text))
        generators = generator or [None]
        report = bench.run(generators[0], **options) if len(generators) == 1 else \
            bench.run_generators(tuple(generators), **options)
    print_json(report) if as_json else bench.print_report(report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
