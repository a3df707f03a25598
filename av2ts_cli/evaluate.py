"""``av2ts eval``: the official metrics (``metrics.py``) for a model or for saved predictions of any model.

Predictions on disk (``--pred-dir``, and what ``--save-pred`` writes): one 8-bit PNG per labelled frame at the
ground-truth label's path relative to the split (S4 ``<category>/<video>/<video>_<k>.png``, MS3
``<video>/<video>_<k>.png``, AVSS ``<label>/<uid>/<frame>.png``). S4/MS3 pixels are the foreground probability x 255
(rounded); AVSS pixels are class indices (a palette PNG, so it also looks right). A prediction has its label's
size (AVSS: the label file's, resized nearest as the label is, or the 224 x 224 AVSS is scored at; S4/MS3 under
``--protocol avsegformer``: 512 x 512, the size that protocol scores at, as AVSegFormer's own predictions are); any
other size is an error naming the file and both sizes: a resized prediction would be scored as if it were right.
The predictions folder is an input: ``metrics.json`` goes to a new ``runs/eval/expN`` (or ``out``), as for a model
(with ``--save-pred``: beside the predictions it wrote).

A model's semantic map (``AV2TS.segment``, at its input size) is resized bilinearly to the label size (S4/MS3
under ``--protocol avsegformer``: to 512 x 512, the labels upsampled to it, ``metrics.upsample_labels``), then
turned into the foreground probability (S4/MS3, softmax over the two channels as COMBO/AV2TS) or the class map
(AVSS). The protocol (``metrics.PROTOCOLS``) also sets the F-score grouping and whether AVSS's padded frames count.
``--shuffle-audio`` feeds each clip the audio of another clip (a fixed, seeded derangement): a control showing how
much the model uses sound.

Under torchrun (``torchrun --nproc-per-node N -m av2ts_cli eval --model ...``) each process scores every N-th clip
on its own device and the per-clip metrics of all processes are merged in CSV order: the result equals a
one-process eval to the last bit. Rank 0 writes ``metrics.json`` and prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.table import Table
from torch.utils.data import DataLoader, Subset

from av2ts_cli.classes import avss_palette
from av2ts_cli.console import console, make_progress, warn
from av2ts_cli.data.datasets import AVSDataset, build_dataset
from av2ts_cli.data.images import image_header, read_rgb, rgb_to_index, write_png
from av2ts_cli.data.layout import SUBSET_TITLES, check_split, check_subset
from av2ts_cli.data.transforms import resize_images
from av2ts_cli.errors import DataError, UsageError, describe, describe_os_error
from av2ts_cli.files import write_json
from av2ts_cli.metrics import AVSS_PADDED_LENGTH, PROTOCOLS, BinaryMetrics, SemanticMetrics, upsample_labels
from av2ts_cli.plots import check_replaceable, draw_metrics
from av2ts_cli.predictor import Predictor, load_predictor
from av2ts_cli.processes import Processes, environment
from av2ts_cli.runs import METRICS_PICTURE, numbered_run_folder, record_owned

RUNS_FOLDER = Path("runs") / "eval"


# ------------------------------------------------------------------------------------------------------- entry
def evaluate(subset: str, data: str | os.PathLike, *, split: str = "test", protocol: str = "av2ts",
             model: str | None = None, pred_dir: str | os.PathLike | None = None,
             save_pred: str | os.PathLike | None = None, shuffle_audio: bool = False, batch: int = 1,
             device: str = "auto", workers: int = 2, seed: int = 0, out: str | os.PathLike | None = None,
             progress: bool = True, precision: str | None = None, half: bool = False) -> dict:
    """Score ``model`` (a ``--model`` name, loaded by ``predictor.load_predictor``) or the PNGs under ``pred_dir``
    and return the report. ``metrics.json`` (the report's ``metrics_file``) goes to ``out``, else beside the predictions
    ``save_pred`` wrote, else to a new ``runs/eval/expN``; never into ``pred_dir``, an input. When it cannot be
    written, the report's ``save_error`` says why in one line (the caller prints the metrics first). ``precision``
    (None: the device's default) and ``half`` as predict's (``model.inference.choose_precision``)."""
    check_subset(subset)
    check_split(split)
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if (model is None) == (pred_dir is None):
        raise UsageError("give exactly one of --model and --pred-dir")
    if pred_dir is not None and (save_pred is not None or shuffle_audio):
        raise UsageError("--save-pred and --shuffle-audio need --model, not --pred-dir")
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    inputs = {"--data": data, "--model": model if model is not None and Path(model).exists() else None}
    for option, target in (("--save-pred", save_pred), ("--out", out)):
        _refuse_inside_inputs(option, target, inputs)

    # --pred-dir under torchrun: every rank scores the whole folder (it is quick) and rank 0 alone writes and prints
    processes = Processes(*environment())
    if pred_dir is not None:
        pred_dir = Path(pred_dir)
        if not pred_dir.is_dir():
            raise DataError(pred_dir, "no such prediction folder")
        if out is not None and Path(out).resolve() == pred_dir.resolve():
            raise UsageError(f"{out}: is the --pred-dir folder, an input; metrics.json goes to another folder")
        dataset = AVSDataset(data, subset, split, cache=None)
        metrics = score_prediction_folder(dataset, pred_dir, protocol, progress=progress)
        source = {"pred_dir": str(pred_dir)}
        folder = None  # the predictions are an input: nothing is written among them
    else:
        processes = Processes.start(device, backend="gloo")  # torchrun: this rank's device and its shard of clips
        try:  # the group is left on any error too
            predictor = load_predictor(str(model), processes.device, half, precision, subset=subset)
            cfg = predictor.cfg
            dataset = build_dataset(subset, data, split, cfg=cfg, train=False)
            if cfg.num_classes != dataset.num_classes:
                raise UsageError(f"model {model} predicts {cfg.num_classes} classes, {subset} has "
                                 f"{dataset.num_classes}")
            if shuffle_audio:
                dataset.audio_from = derangement(len(dataset), seed)
            metrics = evaluate_model(predictor, dataset, protocol, batch=batch, workers=workers,
                                     save_pred=save_pred, progress=progress and processes.main, processes=processes)
        finally:
            processes.stop()
        source = {"model": str(model), "shuffle_audio": shuffle_audio, "precision": predictor.precision,
                  "precision_basis": predictor.precision_basis}
        folder = Path(save_pred) if save_pred is not None else None

    report = {"subset": subset, "split": split, "protocol": protocol, "videos": metrics["videos"],
              "frames": metrics["frames"], "miou": metrics["miou"], "fscore": metrics["fscore"], **source}
    document = {**report, "details": metrics}
    report["metrics_file"] = report["save_error"] = report["metrics_picture"] = None
    report["processes"], report["rank"] = processes.world_size, processes.rank
    if not processes.main:  # rank 0 writes metrics.json and prints; every rank has the same metrics
        return report
    try:  # a metrics.json that cannot be written must not lose the metrics: the caller prints them, then this line
        folder = Path(out) if out is not None else (folder or numbered_run_folder(RUNS_FOLDER))
        report["metrics_file"] = str(write_json(folder / "metrics.json", document))
    except OSError as err:
        report["save_error"] = f"metrics.json not saved: {describe_os_error(err)}"
    else:
        report["metrics_picture"] = draw_picture(document, folder / METRICS_PICTURE, dataset.class_names)
    return report


def draw_picture(document: dict, path: Path, class_names) -> str | None:
    """``metrics.png`` beside ``metrics.json`` (``plots.draw_metrics``) -> its path, or None with a warning: a
    picture that cannot be drawn (a file of the user's in its place, a full disk) leaves the metrics standing."""
    try:
        check_replaceable(path, hint="it is left as it is")
        record_owned(path.parent, [path.name])  # before it is written (runs.record_owned)
        return str(draw_metrics(document, path, class_names))
    except Exception as err:  # the metrics are computed and saved: nothing about a picture may lose them
        warn(f"{path.name} not drawn: {describe(err) or f'{type(err).__name__}: {err}'}")
        return None


def _refuse_inside_inputs(option: str, target: str | os.PathLike | None,
                          inputs: dict[str, str | os.PathLike | None]) -> None:
    """A UsageError when an output folder lies inside an input (the dataset scored against, the model): writing
    predictions among the labels would replace them, and the next eval would score against its own output."""
    if target is None:
        return
    where = Path(target).resolve()
    for name, source in inputs.items():
        if source is None:
            continue
        root = Path(source).resolve()
        if where == root or root in where.parents:
            raise UsageError(f"{option} {target}: is inside {name} {source}, an input; write it elsewhere")


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation of range(n) without fixed points (each clip gets another clip's audio)."""
    if n < 2:
        raise UsageError("--shuffle-audio needs at least 2 videos")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return [int(i) for i in order]


# ------------------------------------------------------------------------------------------------------ models
def evaluate_model(predictor: Predictor, dataset: AVSDataset, protocol: str = "av2ts", *, batch: int = 1,
                   workers: int = 0, save_pred: str | os.PathLike | None = None, progress: bool = False,
                   processes: Processes | None = None) -> dict:
    """Run ``predictor``'s network (put in eval mode) over an evaluation dataset, through ``Predictor.segment`` as
    ``predict`` does, and score it. ``batch``: clips per forward pass (clips of equal length only). ``processes``:
    under torchrun, this rank scores its shard of the clips and the per-video scores of all ranks are merged (every
    rank gets the result). Returns the metrics' result dict.

    Each clip is scored into its own metric and the clips' metrics are merged in CSV order, with one process or
    several: the result is the same to the last bit however the clips were shared out (``SemanticMetrics.merge``).
    """
    processes = processes or Processes()
    new_metric = (lambda: SemanticMetrics(dataset.num_classes)) if dataset.subset == "avss" else BinaryMetrics
    model = predictor.model
    was_training = model.training
    model.eval()
    palette = avss_palette(dataset.num_classes)
    indices = processes.shard(list(range(len(dataset))))
    scored: list[tuple[int, BinaryMetrics | SemanticMetrics]] = []  # (clip index, that clip's metric)
    try:
        with _Progress(progress, len(indices), "evaluating") as advance:
            for items in _batches(Subset(dataset, indices), batch, workers):
                frames = torch.stack([item["frames"] for item in items]).float()
                audio = torch.stack([item["audio"] for item in items])
                maskiges = None
                if "maskiges" in items[0]:
                    maskiges = torch.stack([item["maskiges"] for item in items]).float()
                # the autocast covers the forward only (Predictor.segment): with --workers 0 the loader's log-mel
                # features are computed in this thread, and under a bf16 autocast they came out bf16
                where = f" on {', '.join(str(item['video']) for item in items)}"
                semseg = predictor.segment(frames, audio, maskiges, where)  # [B, T, K, S, S]
                for item, clip_map in zip(items, semseg, strict=True):
                    clip_metric = new_metric()
                    _score_clip(item, clip_map, dataset, clip_metric, protocol, save_pred, palette)
                    scored.append((indices[len(scored)], clip_metric))
                    advance()
    finally:
        model.train(was_training)
    metric = new_metric()
    for _, clip_metric in sorted((pair for part in processes.gather(scored) for pair in part), key=lambda p: p[0]):
        metric.merge(clip_metric)
    return metric.result() if isinstance(metric, SemanticMetrics) else metric.result(protocol)


def _batches(dataset: AVSDataset, batch: int, workers: int) -> Iterator[list[dict]]:
    """Consecutive items (CSV order) in groups of up to ``batch`` with the same number of frames."""
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
    group: list[dict] = []
    for item in loader:
        if group and (len(group) == batch or item["frames"].shape != group[0]["frames"].shape):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _score_clip(item: dict, clip_map: torch.Tensor, dataset: AVSDataset, metric, protocol: str,
                save_pred, palette: np.ndarray) -> None:
    """clip_map: [T, K, S, S] semantic map of one clip; the item's masks are at the label size."""
    from av2ts_cli.model.av2ts import class_map, foreground_probability  # local: timm, not needed for --pred-dir

    annotated = item["supervised"].nonzero().flatten()
    if len(annotated) == 0:
        return
    gt = item["masks"][annotated]
    size = PROTOCOLS[protocol].binary_size
    if dataset.subset != "avss" and size is not None:
        gt = upsample_labels(gt, size)
    semseg = clip_map[annotated.to(clip_map.device)].float()
    if semseg.shape[-2:] != gt.shape[-2:]:
        semseg = F.interpolate(semseg, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    names = [item["mask_paths"][i] for i in annotated.tolist()]
    if dataset.subset == "avss":
        pred = class_map(semseg).cpu()
        metric.update(pred, gt)
        if PROTOCOLS[protocol].avss_padding:
            metric.add_padding(AVSS_PADDED_LENGTH - len(item["mask_paths"]), gt[0].numel())
        if save_pred is not None:
            for name, labels in zip(names, pred.numpy().astype(np.uint8), strict=True):
                write_png(Path(save_pred) / name, labels, palette=palette)
    else:
        prob = foreground_probability(semseg).cpu()
        metric.update(prob, gt == 1)
        if save_pred is not None:
            pixels = torch.round(prob * 255).to(torch.uint8).numpy()
            for name, image in zip(names, pixels, strict=True):
                write_png(Path(save_pred) / name, image)


# ------------------------------------------------------------------------------------------------- predictions
def score_prediction_folder(dataset: AVSDataset, pred_dir: Path, protocol: str = "av2ts",
                            progress: bool = False) -> dict:
    """Score the PNGs under ``pred_dir`` against the dataset's labels (see the module docstring for the format)."""
    metric = SemanticMetrics(dataset.num_classes) if dataset.subset == "avss" else BinaryMetrics()
    palette = avss_palette(dataset.num_classes)
    size = PROTOCOLS[protocol].binary_size
    with _Progress(progress, len(dataset), "scoring") as advance:
        for video in dataset.videos:
            annotated, gt = dataset.eval_labels(video)
            if not annotated:
                advance()
                continue
            paths = [pred_dir / video.mask_names[i] for i in annotated]
            labels = [video.masks[i] for i in annotated]
            if dataset.subset == "avss":
                pred = np.stack([_read_class_prediction(p, label, gt.shape[1:], palette)
                                 for p, label in zip(paths, labels, strict=True)])
                metric.update(torch.from_numpy(pred), torch.from_numpy(gt).long())
                if PROTOCOLS[protocol].avss_padding:
                    metric.add_padding(AVSS_PADDED_LENGTH - video.num_frames, gt[0].size)
            else:
                truth = torch.from_numpy(gt == 1)
                scored_at = None
                if size is not None:
                    truth, scored_at = upsample_labels(truth, size), f"protocol {protocol} scores at {size}x{size}"
                prob = torch.stack([_read_probability(p, label, truth.shape[1:], scored_at)
                                    for p, label in zip(paths, labels, strict=True)])
                metric.update(prob, truth)
            advance()
    return metric.result() if isinstance(metric, SemanticMetrics) else metric.result(protocol)


def _prediction_image(path: Path):
    if not path.is_file():
        raise DataError(path, "missing prediction")
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(path, f"unreadable prediction PNG: {err}") from None


def _wh(size: tuple[int, int]) -> str:
    """(h, w) -> "WxH", as the other size messages write it."""
    return f"{size[1]}x{size[0]}"


def _read_probability(path: Path, label: Path, size: tuple[int, int], scored_at: str | None = None) -> torch.Tensor:
    """An S4/MS3 prediction PNG -> float32 [h, w] probability (pixel / 255); ``size`` (h, w): its label's, or the
    size the protocol scores at (``scored_at`` says which, in words), the only size accepted (a DataError naming
    the file, both sizes and the label otherwise)."""
    image = _prediction_image(path)
    if (image.height, image.width) != tuple(size):
        expected = f"{scored_at} (its label {label} upsampled)" if scored_at else f"its label {label} is {_wh(size)}"
        raise DataError(path, f"prediction is {image.width}x{image.height} but {expected}")
    pixels = np.asarray(image if image.mode == "L" else image.convert("L")).astype(np.float32) / 255.0
    return torch.from_numpy(pixels)


def _read_class_prediction(path: Path, label: Path, size: tuple[int, int], palette: np.ndarray) -> np.ndarray:
    """An AVSS prediction PNG (class indices; palette colours if it is RGB) -> int64 [h, w] at ``size`` (h, w), the
    size AVSS is scored at. Accepted: that size, or its label file's (resized nearest, as the label is); any other
    size is a DataError naming the file, both sizes and the label."""
    image = _prediction_image(path)
    own = (image.height, image.width)
    if own != tuple(size):
        label_w, label_h = image_header(label)
        if own != (label_h, label_w):
            raise DataError(path, f"prediction is {image.width}x{image.height} but its label {label} is "
                                  f"{label_w}x{label_h} (AVSS is scored at {_wh(size)}; either size is accepted)")
    if image.mode in ("L", "P", "I", "I;16"):
        classes = np.asarray(image).astype(np.int64)
    else:
        classes = rgb_to_index(read_rgb(path, "prediction"), palette).astype(np.int64)
    if classes.shape != tuple(size):
        classes = resize_images(classes.astype(np.uint8)[None], *size, nearest=True)[0].astype(np.int64)
    return classes


class _Progress:
    """A rich "videos k/N" bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        self.bar = make_progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(f"{self.description} videos", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def print_report(report: dict) -> None:
    what = report.get("model") or report.get("pred_dir")
    table = Table(title=f"{SUBSET_TITLES[report['subset']]}, {report['split']} split, protocol {report['protocol']}",
                  title_justify="left")
    for column in ("source", "videos", "frames", "mIoU", "F-score"):
        table.add_column(column, justify="left" if column == "source" else "right", overflow="fold")
    suffix = " (shuffled audio)" if report.get("shuffle_audio") else ""
    table.add_row(f"{what}{suffix}", str(report["videos"]), str(report["frames"]), f"{report['miou']:.4f}",
                  f"{report['fscore']:.4f}")
    console.print(table)
    if report.get("metrics_file"):
        console.print(f"Results saved to {report['metrics_file']}", markup=False)
