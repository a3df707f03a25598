"""av2ts_cli/plots.py: results.png of a training run and `av2ts plot`, metrics.png beside an evaluation's
metrics.json, predict's preview.jpg. The pictures are checked by their pixels: they exist after a real tiny run,
change when their data change (equal data, equal pixels), and a preview's cells are the decoded frames with the
masks of masks/ painted on them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_cli
from PIL import Image

from av2ts_cli import evaluate, media, plots, predict
from av2ts_cli.classes import AVSS_CLASSES
from av2ts_cli.data.layout import list_videos, resolve_root
from av2ts_cli.render import MaskPainter
from av2ts_cli.runs import LOG_FILE, METRICS_PICTURE, OWNED_FILE, PREVIEW_FILE, RESULTS_FILE, owned_files
from av2ts_cli.weights.registry import DEMO_MODEL_DIR

DEMO_CLIP = Path(__file__).resolve().parent.parent / "assets" / "demo.mp4"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def one_line_error(args: list[str], code: int) -> str:
    result = invoke_cli(args, expect=code)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return " ".join(lines[0].split())


def copy_log(run: Path, folder: Path, scale: float = 1.0) -> Path:
    """``run``'s log.csv in a new folder, every loss multiplied by ``scale``."""
    folder.mkdir(parents=True)
    with open(run / LOG_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss") and value:
                row[key] = str(float(value) * scale)
    with open(folder / LOG_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


# --------------------------------------------------------------------------------------------- training curves
def test_a_training_run_keeps_its_curves_in_results_png(straight_run):
    """`av2ts train` (6 iterations, evaluated at 3 and 6) drew results.png in its run folder, as its own file."""
    picture = straight_run / RESULTS_FILE
    assert picture.is_file() and RESULTS_FILE in owned_files(straight_run)
    image = pixels(picture)
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 10  # panels, not a blank page


def test_the_curves_change_when_the_log_does(straight_run, tmp_path):
    same = plots.read_curves(straight_run / LOG_FILE)
    halved = plots.read_curves(copy_log(straight_run, tmp_path / "halved", 0.5) / LOG_FILE)
    one = plots.draw_curves([("run", same)], tmp_path / "one.png")
    again = plots.draw_curves([("run", same)], tmp_path / "again.png")
    other = plots.draw_curves([("run", halved)], tmp_path / "other.png")
    assert np.array_equal(pixels(one), pixels(again))  # the picture is a function of the log
    assert not np.array_equal(pixels(one), pixels(other))
    assert [r["iteration"] for r in same] == [1, 2, 3, 4, 5, 6] and same[2]["val_miou"] is not None


def test_av2ts_plot_draws_one_run_or_several_where_it_may(straight_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_log(straight_run, tmp_path / "a")
    copy_log(straight_run, tmp_path / "b", 2.0)
    result = invoke_cli(["plot", "a"])
    assert "Results saved to a/results.png" in result.output and RESULTS_FILE in owned_files(tmp_path / "a")
    invoke_cli(["plot", "a"])  # its own file: redrawn
    assert "runs/plot/exp/compare.png" in invoke_cli(["plot", "a", "b"]).output
    assert "runs/plot/exp2/compare.png" in invoke_cli(["plot", "a", "b/log.csv"]).output  # never over the last
    compared = pixels(tmp_path / "runs/plot/exp/compare.png")
    assert compared.shape != pixels(tmp_path / "a/results.png").shape or not np.array_equal(
        compared, pixels(tmp_path / "a/results.png"))
    invoke_cli(["plot", "a", "b", "-o", "both.svg"])
    assert (tmp_path / "both.svg").read_text().lstrip().startswith("<?xml")

    (tmp_path / "mine.png").write_bytes(b"the user's own picture")
    line = one_line_error(["plot", "a", "-o", "mine.png"], 2)
    assert line == "error: mine.png: the file exists and av2ts did not write it; pass --force to replace it, or " \
                   "give another -o"
    assert (tmp_path / "mine.png").read_bytes() == b"the user's own picture"
    invoke_cli(["plot", "a", "-o", "mine.png", "--force"])
    assert pixels(tmp_path / "mine.png").shape[0] > 300
    assert "give a file ending in .png" in one_line_error(["plot", "a", "-o", "curves.txt"], 2)


@pytest.mark.parametrize("case", ["missing folder", "no log", "empty log", "bad cell", "no iteration"])
def test_av2ts_plot_bad_input_is_one_line_naming_the_file(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    if case != "missing folder":
        run.mkdir()
    text = {"empty log": "iteration,loss,lr\n", "bad cell": "iteration,loss,lr\n1,0.5,1e-3\n2,oops,1e-3\n",
            "no iteration": "step,loss\n1,0.5\n"}.get(case)
    if text is not None:
        (run / LOG_FILE).write_text(text)
    expected = {"missing folder": "error: run: no such run folder",
                "no log": "error: run/log.csv: no such file (not a training run folder?)",
                "empty log": "error: run/log.csv: no rows yet (the run logged no iteration)",
                "bad cell": "error: run/log.csv: line 3: loss is not a number ('oops')",
                "no iteration": "error: run/log.csv: not a training log: no iteration column"}[case]
    assert one_line_error(["plot", "run"], 1) == expected
    assert not (run / RESULTS_FILE).exists() and not (tmp_path / "runs").exists()


def test_the_trainer_leaves_a_results_png_of_the_users_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOG_FILE).write_text("iteration,loss,lr\n1,0.5,1e-3\n")
    (run / RESULTS_FILE).write_bytes(b"mine")
    with pytest.raises(Exception, match="the file exists and av2ts did not write it; it is left as it is"):
        plots.write_results(run)
    assert (run / RESULTS_FILE).read_bytes() == b"mine"


# -------------------------------------------------------------------------------------------------- evaluation
def test_eval_of_a_trained_model_writes_metrics_png_beside_metrics_json(straight_run, small_s4, tmp_path):
    out = tmp_path / "eval"  # --save-pred: metrics.json goes beside the predictions
    report = json.loads(invoke_cli(["eval", "--subset", "s4", "--data", str(small_s4), "--model",
                                    str(straight_run / "best"), "--split", "val", "--workers", "0", "--save-pred",
                                    str(out), "--json"]).stdout)
    assert report["metrics_file"] == str(out / "metrics.json")
    details = json.loads((out / "metrics.json").read_text())["details"]
    assert len(details["fscore_curve"]) == 255 and len(details["video_miou"]) == report["videos"]
    assert (out / METRICS_PICTURE).is_file() and owned_files(out) == [METRICS_PICTURE]
    assert pixels(out / METRICS_PICTURE).std() > 10


def _predictions(synth_data: Path, subset: str, out: Path, spoil: bool) -> Path:
    """The ground truth as predictions; ``spoil``: the left half of every other frame made background."""
    for video in list_videos(resolve_root(synth_data, subset), subset, "test"):
        for i in video.annotated:
            target = out / video.mask_names[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(video.masks[i]) as image:
                values = np.asarray(image).copy()
                if spoil and i % 2 == 0:
                    values[:, : values.shape[1] // 2] = 0
                spoiled = Image.fromarray(values)
                if image.mode == "P":
                    spoiled.putpalette(image.getpalette())
                spoiled.save(target)
    return out


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_metrics_png_changes_when_the_predictions_do(subset, synth_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # metrics.json of --pred-dir goes to a new runs/eval/expN
    pictures = []
    for spoil in (False, True):
        pred = _predictions(synth_data, subset, tmp_path / f"pred-{spoil}", spoil)
        report = json.loads(invoke_cli(["eval", "--subset", subset, "--data", str(synth_data), "--pred-dir",
                                        str(pred), "--json"]).stdout)
        pictures.append(pixels(Path(report["metrics_file"]).with_name(METRICS_PICTURE)))
    assert pictures[0].shape == pictures[1].shape and not np.array_equal(*pictures)
    if subset == "avss":  # one bar per class, the classes never in the ground truth named and counted
        details = json.loads((tmp_path / "runs/eval/exp/metrics.json").read_text())["details"]
        present = details["per_class"]["present"]
        assert len(present) == 71 and present[0] > 0 and 0 < present.count(0) < 71
        assert pictures[0].shape[0] > 1200  # 71 bars in a tall figure


def test_a_metrics_png_of_the_users_is_left_with_a_warning(synth_data, tmp_path, capsys):
    pred = _predictions(synth_data, "s4", tmp_path / "pred", spoil=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / METRICS_PICTURE).write_bytes(b"mine")
    report = evaluate.evaluate("s4", synth_data, pred_dir=pred, out=tmp_path / "out", progress=False)
    assert report["metrics_file"] == str(tmp_path / "out" / "metrics.json") and report["metrics_picture"] is None
    assert (tmp_path / "out" / METRICS_PICTURE).read_bytes() == b"mine"
    assert "metrics.png not drawn" in " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------------------------------------------- previews
def test_a_sheets_cells_are_the_frames_with_their_masks_and_its_legend_names_the_classes():
    colours = MaskPainter().colour_table("avss")
    display, frames = (96, 64), 20
    sheet = plots.PreviewSheet(frames, display, colours, AVSS_CLASSES, "clip")
    assert sheet.chosen == plots.preview_indices(frames) and len(sheet.chosen) == 16
    assert sheet.chosen[0] == 0 and sheet.chosen[-1] == frames - 1
    rng = np.random.default_rng(0)
    expected = []
    for index in range(frames):
        picture = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros(display[::-1], np.uint8)
        mask[8 + index:40, 10:50 + index] = 5 if index % 2 else 12  # bird, clarinet
        sheet.keep(index, picture)
        sheet.add(index, index + 15 / 16, mask)
        if index in sheet.chosen:
            cell = sheet.cell
            thumb = np.asarray(Image.fromarray(picture).resize(cell, Image.Resampling.BILINEAR))
            small = np.asarray(Image.fromarray(mask).resize(cell, Image.Resampling.NEAREST))
            expected.append(plots.paint(thumb, small, colours))
    image = np.asarray(sheet.image())
    for (x, y), cell in zip(plots.sheet_boxes(16, sheet.cell), expected, strict=True):
        got = image[y:y + cell.shape[0], x:x + cell.shape[1]].copy()
        got[:20, :60] = cell[:20, :60]  # the time stamp's corner
        assert np.array_equal(got, cell)
    below = image[plots.sheet_boxes(16, sheet.cell)[-1][1] + sheet.cell[1]:].reshape(-1, 3)
    for class_id in (5, 12):  # the legend's swatches: each class painted, in its colour
        assert (below == colours[class_id]).all(axis=1).sum() >= 100


def test_predict_writes_a_preview_whose_cells_carry_the_masks(tmp_path, monkeypatch):
    """The demo model on the demo clip: each cell of preview.jpg is the frame the model saw, decoded once, with
    that time's mask of masks/ painted; painted with another time's mask, or not at all, it differs more."""
    decodes = []
    iter_frames_at = media.iter_frames_at

    def counted(*args, **kwargs):
        decodes.append(args[0])
        return iter_frames_at(*args, **kwargs)

    monkeypatch.setattr(media, "iter_frames_at", counted)
    report = predict.run([DEMO_CLIP], predict.PredictOptions(out=tmp_path / "run", progress=False,
                                                             formats=("png", "json", "preview")))
    assert len(decodes) == 1  # the preview's frames come from the model's own decode
    folder = Path(report.videos[0].folder)
    summary = json.loads((folder / "summary.json").read_text())
    assert PREVIEW_FILE in summary["files"] and PREVIEW_FILE in owned_files(folder)
    assert json.loads((folder / OWNED_FILE).read_text())["files"].count(PREVIEW_FILE) == 1

    lines = [json.loads(line) for line in (folder / "frames.jsonl").read_text().splitlines()]
    info = media.probe(DEMO_CLIP)
    size = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["input_size"]
    chosen = plots.preview_indices(len(lines))
    cell = plots.cell_size((info.width, info.height))
    # the frames again, by the decoder itself (not counted): what the model saw at those times
    decoded = [frame for _, frame in iter_frames_at(DEMO_CLIP, [lines[i]["time"] for i in chosen], (size, size))]
    colours = MaskPainter().colour_table("binary")
    sheet = pixels(folder / PREVIEW_FILE)

    def mask_at_cell(mask_file: str | None) -> np.ndarray:
        if mask_file is None:
            return np.zeros(cell[::-1], np.uint8)
        with Image.open(folder / mask_file) as image:
            return (np.asarray(image.resize(cell, Image.Resampling.NEAREST)) > 0).astype(np.uint8)

    errors = []  # per cell: (its own mask, another time's, none), each where it differs from its own mask
    for k, ((x, y), index, frame) in enumerate(zip(plots.sheet_boxes(len(chosen), cell), chosen, decoded,
                                                   strict=True)):
        got = sheet[y:y + cell[1], x:x + cell[0]]
        thumb = np.asarray(Image.fromarray(frame).resize(cell, Image.Resampling.BILINEAR))
        own = mask_at_cell(lines[index]["mask"])
        other = mask_at_cell(lines[chosen[(k + len(chosen) // 2) % len(chosen)]]["mask"])
        row = []
        for alternative in (other, np.zeros_like(own)):
            region = own != alternative
            region[:24] = False  # the time stamp
            assert region.sum() > 200  # the masks differ where it counts: the comparison means something
            row += [float(np.abs(got - plots.paint(thumb, m, colours).astype(np.int16))[region].mean())
                    for m in (own, alternative)]
        errors.append(row)
    errors = np.array(errors)  # [cells, (own vs other, other, own vs none, none)]
    assert errors[:, [0, 2]].max() < 15.0, errors  # JPEG's error only (its 4:2:0 colour blurs the 2 px border)
    assert (errors[:, 1] > 4 * errors[:, 0]).all() and (errors[:, 3] > 4 * errors[:, 2]).all(), errors

