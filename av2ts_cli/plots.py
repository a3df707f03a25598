"""Pictures: a run's training curves (``results.png``, ``av2ts plot``), the picture beside an evaluation's
``metrics.json`` (``metrics.png``) and the contact sheet of a predicted video (``preview.jpg``).

matplotlib draws the first two. It is imported inside the functions that draw (0.8 s on the 2-core machine, which
no other command should wait for) and used through its Agg canvas only (``Figure`` + ``FigureCanvasAgg``, no
pyplot: no GUI backend, no global figure state, nothing left open in a training process). The preview is drawn
with Pillow alone: predict makes one per video by default, so it must cost milliseconds, and it is made of the
small frames predict decodes for the model anyway (no second decode of the video).

Every picture is written atomically (``files.atomic_path``) and replaces only a file av2ts wrote (the folder's
ownership record, ``runs.record_owned``), unless ``force``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from av2ts_cli.errors import DataError, UsageError
from av2ts_cli.files import atomic_path
from av2ts_cli.runs import LOG_FILE, RESULTS_FILE, numbered_run_folder, owned_files, record_owned

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what the Agg canvas (and its vector siblings) write
COMPARE_FILE = "compare.png"  # av2ts plot RUN1 RUN2 ...: in a new runs/plot/expN
RUNS_FOLDER = Path("runs") / "plot"
_NOT_PLOTTED = ("iteration", "seconds")  # the x axis, and wall time (it depends on the machine, not the recipe)
_TITLES = {"loss": "total loss", "lr": "learning rate", "val_miou": "mIoU (evaluation split)",
           "val_fscore": "F-score (evaluation split)"}


# ------------------------------------------------------------------------------------------------- ownership
def check_replaceable(path: Path, force: bool = False, hint: str = "pass --force to replace it") -> None:
    """A UsageError when ``path`` exists and av2ts did not write it (its folder's record does not list it): a
    picture never destroys a file of the user's of the same name."""
    if force or not path.exists():
        return
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a file name")
    if path.name not in (owned_files(path.parent) or []):
        raise UsageError(f"{path}: the file exists and av2ts did not write it; {hint}")


def _save_figure(fig, path: Path) -> Path:
    """Render a matplotlib ``Figure`` with the Agg canvas into ``path`` (format from the suffix), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # local: matplotlib only where a picture is drawn

    canvas = FigureCanvasAgg(fig)
    with atomic_path(path) as temp:
        canvas.print_figure(temp, format=path.suffix.lstrip(".").lower(), dpi=100)
    return path


# ------------------------------------------------------------------------------------------- training curves
def read_curves(path: Path) -> list[dict[str, float | None]]:
    """The rows of a run's ``log.csv`` in file order, every cell a float (an empty one None). A DataError naming
    the file when it is missing, has no ``iteration`` column, a cell that is no number, or no row yet."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            raw = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise DataError(path, "no such file (not a training run folder?)") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"not a CSV file ({err})") from None
    if "iteration" not in columns:
        raise DataError(path, "not a training log: no iteration column")
    rows = []
    for line, row in enumerate(raw, start=2):
        values = {}
        for column in columns:
            cell = (row.get(column) or "").strip()
            try:
                values[column] = float(cell) if cell else None
            except ValueError:
                raise DataError(path, f"line {line}: {column} is not a number ({cell!r})") from None
        if values["iteration"] is None:
            raise DataError(path, f"line {line}: no iteration")
        rows.append(values)
    if not rows:
        raise DataError(path, "no rows yet (the run logged no iteration)")
    return rows


def _series(rows: Sequence[dict], column: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of ``column``'s finite cells: eval columns are empty between evaluations."""
    pairs = [(r["iteration"], r.get(column)) for r in rows]
    kept = [(x, y) for x, y in pairs if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _best(rows: Sequence[dict]) -> str:
    """" best mIoU 0.9565 at 1500" of a run's rows, or "" before its first evaluation."""
    scored = [(r["val_miou"], r["iteration"]) for r in rows if r.get("val_miou") is not None]
    if not scored:
        return ""
    miou, iteration = max(scored, key=lambda pair: (pair[0], -pair[1]))  # the first best, as the trainer keeps it
    return f", best mIoU {miou:.4f} at {iteration:.0f}"


def draw_curves(runs: Sequence[tuple[str, Sequence[dict]]], out: Path) -> Path:
    """One panel per logged quantity (each loss group, the learning rate, the evaluation's mIoU and F) against the
    iteration, one line per run (``runs``: (label, ``read_curves`` rows)), drawn into ``out`` atomically."""
    from matplotlib.figure import Figure  # local: matplotlib only where a picture is drawn
    from matplotlib.ticker import MaxNLocator

    columns: list[str] = []
    for _, rows in runs:  # the log's own order: total loss, the groups, lr, evaluation (a new column goes last)
        columns += [c for c in rows[0] if c not in columns and c not in _NOT_PLOTTED]
    # a loss group the family does not have is logged as 0 (AV2TS has no loss_mix): no panel for it
    columns = [c for c in columns if any(any(_series(rows, c)[1]) for _, rows in runs)]
    per_row = 3 if len(columns) in (3, 5, 6, 9) else min(4, max(1, len(columns)))
    panel_rows = max(1, math.ceil(len(columns) / per_row))
    last = max(rows[-1]["iteration"] for _, rows in runs)
    fig = Figure(figsize=(4.2 * per_row, 2.9 * panel_rows + 0.6), layout="constrained")
    axes = fig.subplots(panel_rows, per_row, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    lines = []
    for ax, column in zip(axes, columns, strict=False):
        ax.set_title(_TITLES.get(column, column), fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_xlim(0, max(1.0, last) * 1.02)  # one iteration axis for every panel: evaluations line up with losses
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        values = []
        for (label, rows), colour in zip(runs, colours, strict=True):
            x, y = _series(rows, column)
            values += y
            # few points (evaluations, short runs) are invisible as a bare line
            line, = ax.plot(x, y, color=colour, marker="o" if len(x) <= 30 else None, markersize=3, linewidth=1.2,
                            label=f"{label}{_best(rows)}")
            if column == columns[0]:
                lines.append(line)
        if column.startswith("val_"):
            ax.set_ylim(-0.02, 1.02)  # scores live in [0, 1]: runs and evaluations compare at one glance
        elif column.startswith("loss") and values and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # a loss that falls by decades would show only its first steps on a linear axis
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    if len(runs) == 1:
        label, rows = runs[0]
        fig.suptitle(f"{label}: {rows[-1]['iteration']:.0f} iterations{_best(rows)}", fontsize=11)
    else:
        fig.legend(handles=lines, loc="outside upper center", ncols=min(len(runs), 3), fontsize=9, frameon=False)
    return _save_figure(fig, out)


def write_results(run: Path) -> Path:
    """``run/results.png`` from ``run/log.csv``: what the trainer redraws at every evaluation and at the end. A
    UsageError when a ``results.png`` av2ts did not write is in the way; DataError for a log without rows."""
    out = run / RESULTS_FILE
    check_replaceable(out, hint="it is left as it is")
    rows = read_curves(run / LOG_FILE)
    record_owned(run, [RESULTS_FILE])  # before it is written (runs.record_owned)
    return draw_curves([(str(run), rows)], out)


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """``av2ts plot RUN...``: the curves of one run or several side by side (a run folder, or its ``log.csv``).
    Default ``out``: ``RUN/results.png`` for one run (the picture train keeps there, redrawn), a new
    ``runs/plot/expN/compare.png`` for several. Every input is read before anything is written."""
    if not runs:
        raise UsageError("give at least one run folder")
    curves = []
    for given in runs:
        run = Path(given)
        if not run.exists():
            raise DataError(run, "no such run folder")
        log = run if run.is_file() else run / LOG_FILE  # a log.csv given as it is (or a copy under another name)
        curves.append((str(run.parent if run.is_file() and run.name == LOG_FILE else run), read_curves(log)))
    target = Path(out) if out is not None else None
    if target is not None and target.is_dir():
        target = target / (RESULTS_FILE if len(runs) == 1 else COMPARE_FILE)
    if target is not None and target.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"-o {out}: give a file ending in {', '.join(PLOT_SUFFIXES)}")
    if target is None:
        first = Path(runs[0])
        target = ((first.parent if first.is_file() else first) / RESULTS_FILE if len(runs) == 1
                  else numbered_run_folder(RUNS_FOLDER) / COMPARE_FILE)
    check_replaceable(target, force, hint="pass --force to replace it, or give another -o")
    target.parent.mkdir(parents=True, exist_ok=True)
    record_owned(target.parent, [target.name])
    return draw_curves(curves, target)


# ---------------------------------------------------------------------------------------------- evaluation
def draw_metrics(document: dict, out: Path, class_names: Sequence[str]) -> Path:
    """``metrics.png`` of an evaluation (``document``: what ``metrics.json`` holds; ``details`` the metric's
    result). S4/MS3: the F-score curve over the 255 thresholds (``details["fscore_curve"]``, [255]) and the
    per-video mIoU distribution (``details["video_miou"]``, [videos]); AVSS: the per-class IoU and F as sorted bars
    (``details["per_class"]``: "iou", "fscore", "frames", "present", each [K]), the classes never in the split's
    ground truth marked. ``class_names``: [K] (a missing name is drawn as "class N")."""
    from matplotlib.figure import Figure  # local: matplotlib only where a picture is drawn

    details = document["details"]
    source = document.get("model") or document.get("pred_dir") or ""
    title = (f"{document['subset'].upper()}, {document['split']} split, protocol {document['protocol']}: mIoU "
             f"{document['miou']:.4f}, F-score {document['fscore']:.4f} ({document['videos']} videos, "
             f"{document['frames']} frames)\n{source}")
    if "per_class" in details:
        classes = len(details["per_class"]["iou"])
        fig = Figure(figsize=(12, 1.6 + 0.17 * classes), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, key, name in zip(axes, ("iou", "fscore"), ("IoU", "F-score"), strict=True):
            absent = _class_bars(ax, details["per_class"], key, name, class_names)
        title += (f"\ngrey: {absent} of the {classes} classes are never in this split's ground truth (each counts "
                  "as 0 in the mean)" if absent else "")
    else:
        fig = Figure(figsize=(12, 4.4), layout="constrained")
        curve_ax, spread_ax = fig.subplots(1, 2)
        _fscore_curve(curve_ax, details, document["fscore"])
        _miou_spread(spread_ax, details, document["miou"])
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, out)


def _fscore_curve(ax, details: dict, fscore: float) -> None:
    curve = np.asarray(details.get("fscore_curve") or [], dtype=float)  # [255]: mean over the groups' curves
    group = details.get("fscore_group_size", 1)
    groups = math.ceil(len(details.get("video_miou") or []) / max(1, group))
    ax.set_title(f"F(t) over the {len(curve)} thresholds: the mean curve of {groups} groups of {group} video"
                 f"{'s' if group != 1 else ''}", fontsize=9)
    ax.set_xlabel("threshold t on the foreground probability", fontsize=8)
    ax.set_ylabel("F (beta² = 0.3)", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if curve.size:
        thresholds = np.linspace(0.0, 1.0, curve.size)  # metrics.fscore_thresholds, whose last rounds to 1.0
        best = int(curve.argmax())
        ax.plot(thresholds, curve, color="C0", linewidth=1.5)
        ax.plot([thresholds[best]], [curve[best]], "o", color="C3",
                label=f"curve's max {curve[best]:.4f} at t = {thresholds[best]:.3f}")
    # the reported F takes each group's own best threshold, so it can lie above the mean curve's max
    ax.axhline(fscore, color="C2", linestyle="--", linewidth=1,
               label=f"F-score (mean of each group's max) {fscore:.4f}")
    ax.legend(fontsize=8, loc="lower left")


def _miou_spread(ax, details: dict, miou: float) -> None:
    from matplotlib.ticker import MaxNLocator  # local: matplotlib only where a picture is drawn

    per_video = np.asarray(details.get("video_miou") or [], dtype=float)  # [videos]: mean J over each one's frames
    ax.set_title(f"mIoU per video ({per_video.size} videos)", fontsize=9)
    ax.set_xlabel("mIoU of a video (mean over its annotated frames)", fontsize=8)
    ax.set_ylabel("videos", fontsize=8)
    ax.hist(per_video, bins=np.linspace(0.0, 1.0, 21), color="C0", edgecolor="white")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of videos
    ax.axvline(miou, color="C2", linestyle="--", linewidth=1, label=f"mIoU (mean over frames) {miou:.4f}")
    ax.set_xlim(0.0, 1.0)
    ax.legend(fontsize=8, loc="upper left")


def _class_bars(ax, per_class: dict, key: str, name: str, class_names: Sequence[str]) -> int:
    """Horizontal bars of ``per_class[key]`` ([K], one value per class), best first; classes never in the ground
    truth (``per_class["present"]`` [K] is 0; older metrics.json without it: ``"frames"``) last, grey and named so
    (they count as 0 in the mean) -> how many those are."""
    values = per_class[key]
    present = per_class.get("present") or per_class["frames"]  # frames whose ground truth holds the class
    names = [class_names[i] if i < len(class_names) else f"class {i}" for i in range(len(values))]
    order = sorted(range(len(values)), key=lambda i: (present[i] == 0, -values[i], names[i]))
    absent = [present[i] == 0 for i in order]
    y = np.arange(len(order))[::-1]  # the first class at the top
    colours = ["#c8c8c8" if gone else "C0" for gone in absent]
    bars = ax.barh(y, [values[i] for i in order], color=colours, height=0.75)
    ax.bar_label(bars, labels=["" if gone else f"{values[i]:.2f}" for i, gone in zip(order, absent, strict=True)],
                 fontsize=6, padding=2)
    ax.set_yticks(y, [f"{names[i]} (not in split)" if gone else names[i] for i, gone in zip(order, absent,
                                                                                               strict=True)])
    for label, gone in zip(ax.get_yticklabels(), absent, strict=True):
        label.set_color("#909090" if gone else "black")
    ax.tick_params(axis="y", labelsize=6)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlim(0.0, 1.1)  # room for the value beside a full bar
    ax.set_xticks(np.linspace(0.0, 1.0, 6))
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    mean = float(np.mean(values)) if values else 0.0
    ax.set_title(f"{name} per class, best first (mean of all {len(values)}: {mean:.4f})", fontsize=9)
    return sum(absent)


# ------------------------------------------------------------------------------------------------ previews
PREVIEW_FRAMES = 16
CELL_SIZE = 240  # px, the long side of a frame on the sheet
_GAP, _HEADER, _LEGEND_ROW = 4, 24, 20
_BACKGROUND, _TEXT = (32, 32, 32), (240, 240, 240)


def preview_indices(count: int, limit: int = PREVIEW_FRAMES) -> list[int]:
    """Up to ``limit`` of ``count`` sampled frames, evenly spread from the first to the last."""
    if count <= limit:
        return list(range(count))
    return sorted({round(k * (count - 1) / (limit - 1)) for k in range(limit)})


def cell_size(display: tuple[int, int], long_side: int = CELL_SIZE) -> tuple[int, int]:
    """(width, height) of a frame on the sheet: the video's display aspect (``display`` = (W, H)), long side
    ``long_side``."""
    width, height = display
    scale = long_side / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def sheet_boxes(count: int, cell: tuple[int, int]) -> list[tuple[int, int]]:
    """The top-left corner (x, y) of each of ``count`` cells of ``cell`` = (w, h) on the sheet."""
    columns = max(1, math.ceil(math.sqrt(count)))
    width, height = cell
    return [(_GAP + (k % columns) * (width + _GAP), _HEADER + (k // columns) * (height + _GAP)) for k in range(count)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: its one bitmap font
        return ImageFont.load_default()


def _stamp(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}:{rest:05.2f}" if minutes else f"{rest:.2f} s"


class PreviewSheet:
    """The contact sheet of one predicted video: up to ``PREVIEW_FRAMES`` sampled frames spread over it, each with
    its mask painted (half the mask's colour over the frame, as the overlay paints) and its time; the classes shown
    in a legend below (AVSS: their names).

    It is fed from two sides. ``keep(index, picture)`` is called by predict's decoding thread with every decoded
    frame (uint8 [S, S, 3], the model's square input) and keeps a small copy of the chosen ones, so the preview
    needs no second decode. ``add(index, time, classes)`` is called by the writers with each frame's mask
    (uint8 [H, W] class ids at the display size), in index order; the frame was decoded before its mask exists.
    ``colours``: uint8 [256, 3], the colour of each class id (``render.MaskPainter.colour_table``)."""

    def __init__(self, frame_count: int, display: tuple[int, int], colours: np.ndarray, class_names: Sequence[str],
                 title: str, limit: int = PREVIEW_FRAMES):
        self.chosen = preview_indices(frame_count, limit)
        self._wanted = frozenset(self.chosen)
        self.frame_count, self.cell = frame_count, cell_size(display)
        self.colours, self.class_names, self.title = np.asarray(colours, np.uint8), list(class_names), title
        self._pictures: dict[int, np.ndarray] = {}  # index -> uint8 [h, w, 3] at cell size, waiting for its mask
        self._cells: dict[int, tuple[np.ndarray, float]] = {}  # index -> (painted cell, time)
        self._shown: set[int] = set()  # class ids painted on some cell

    def keep(self, index: int, picture: np.ndarray) -> None:
        """A decoded frame, uint8 [S, S, 3]: a copy at cell size if it is one of the chosen (any thread)."""
        if index in self._wanted and index not in self._pictures:
            # the model's input is squeezed to a square: the resize gives the display aspect back
            self._pictures[index] = np.asarray(Image.fromarray(picture).resize(self.cell, Image.Resampling.BILINEAR))

    def add(self, index: int, time: float, classes: np.ndarray) -> None:
        """The mask of frame ``index``: classes uint8 [H, W] at display size."""
        if index not in self._wanted:
            return
        picture = self._pictures.pop(index, None)
        if picture is None:  # a writer fed without the decoder's frames (no ``keep``): the mask on grey
            picture = np.full((*self.cell[::-1], 3), 128, np.uint8)
        mask = np.asarray(Image.fromarray(classes).resize(self.cell, Image.Resampling.NEAREST))
        self._cells[index] = (paint(picture, mask, self.colours), time)
        self._shown.update(int(c) for c in np.unique(mask) if c)

    def image(self) -> Image.Image:
        """The sheet: a title line, the cells in time order (row by row), the legend."""
        cells = [self._cells[i] for i in self.chosen if i in self._cells]
        boxes = sheet_boxes(len(cells), self.cell)
        columns = max(1, math.ceil(math.sqrt(len(cells))))
        width = _GAP + min(columns, max(1, len(cells))) * (self.cell[0] + _GAP)
        width = max(width, 320)  # room for the title of a one-frame video
        font, small = _font(14), _font(12)
        entries = [(int(c), self.class_names[c] if c < len(self.class_names) else f"class {c}")
                   for c in sorted(self._shown)]
        # legend entries: a swatch and the name, packed into lines as wide as the sheet
        lines, line, used = [], [], _GAP
        for class_id, name in entries:
            span = 14 + 4 + int(small.getlength(name)) + 16
            if line and used + span > width:
                lines.append(line)
                line, used = [], _GAP
            line.append((class_id, name, used))
            used += span
        if line:
            lines.append(line)
        rows = math.ceil(len(cells) / columns) if cells else 0
        height = _HEADER + rows * (self.cell[1] + _GAP) + len(lines) * _LEGEND_ROW + (_GAP if lines else 0)
        sheet = Image.new("RGB", (width, max(height, _HEADER + _GAP)), _BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        draw.text((_GAP + 2, 4), f"{self.title}: {len(cells)} of {self.frame_count} masks", fill=_TEXT, font=font)
        for (cell, time), (x, y) in zip(cells, boxes, strict=True):
            sheet.paste(Image.fromarray(cell), (x, y))
            text = _stamp(time)
            box = draw.textbbox((x + 4, y + 3), text, font=small)
            draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
            draw.text((x + 4, y + 3), text, fill=_TEXT, font=small)
        top = _HEADER + rows * (self.cell[1] + _GAP)
        for number, line in enumerate(lines):
            y = top + number * _LEGEND_ROW
            for class_id, name, x in line:
                draw.rectangle((x, y + 3, x + 14, y + 15), fill=tuple(int(v) for v in self.colours[class_id]),
                               outline=_TEXT)
                draw.text((x + 18, y + 2), name, fill=_TEXT, font=small)
        return sheet

    def write(self, path: Path) -> Path:
        """The sheet as a JPEG at ``path``, atomically."""
        with atomic_path(path) as temp:
            # 4:4:4 (no halved colour resolution): the 2 px borders keep their colour
            self.image().save(temp, format="JPEG", quality=90, subsampling=0)
        return path


def paint(picture: np.ndarray, mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """picture uint8 [h, w, 3], mask uint8 [h, w] class ids, colours uint8 [256, 3] -> uint8 [h, w, 3]: half the
    class's colour over the picture where the mask is not background (the overlay's default alpha, 0.5), and its
    border (``mask_border``) in the colour itself: half orange over a green object is olive, which reads as the
    object's own colour on a small cell, while the outline shows where the mask ends."""
    layer = colours[mask]
    out = picture.copy()
    fill = mask > 0
    blended = np.round(0.5 * picture.astype(np.float32) + 0.5 * layer.astype(np.float32))
    out[fill] = blended[fill].astype(np.uint8)
    border = mask_border(mask)
    out[border] = layer[border]
    return out


def mask_border(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """mask uint8 [h, w] class ids -> bool [h, w]: the pixels of a class region within ``width`` pixels (up, down,
    left, right) of another value, inside the region only (background never gets a border)."""
    edge = np.zeros(mask.shape, bool)
    for d in range(1, width + 1):
        edge[d:] |= mask[d:] != mask[:-d]
        edge[:-d] |= mask[:-d] != mask[d:]
        edge[:, d:] |= mask[:, d:] != mask[:, :-d]
        edge[:, :-d] |= mask[:, :-d] != mask[:, d:]
    return edge & (mask > 0)
