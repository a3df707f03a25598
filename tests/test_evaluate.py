"""`av2ts eval` (av2ts_cli/evaluate.py): saved predictions scored against hand-expected values, a model's
predictions saved and re-scored, shuffled audio, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.config import get_preset
from av2ts_cli.data.layout import list_videos, resolve_root
from av2ts_cli.evaluate import derangement
from av2ts_cli.model import build_model
from av2ts_cli.weights.checkpoint import save_checkpoint
from av2ts_cli.weights.registry import DEMO_MODEL_DIR

runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A private cache, and the test's folder as the working directory: runs/eval/expN is written there."""
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def invoke(args: list[str], expect: int = 0):
    cli._state["debug"] = False
    result = runner.invoke(cli.app, args)
    assert result.exit_code == expect, result.output
    return result


def eval_json(*args: str) -> dict:
    return json.loads(invoke(["eval", *args, "--json"]).stdout)


def one_line_error(args: list[str], code: int = 1) -> str:
    result = invoke(args, expect=code)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def random_models(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised av2ts-tiny checkpoints (64 px input) for S4 and AVSS."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    models = {}
    for subset in ("s4", "avss"):
        cfg = get_preset("av2ts-tiny", subset)
        cfg.input_size = 64
        models[subset] = save_checkpoint(build_model(cfg), cfg, root / subset)
    return models


def copy_labels(synth_data: Path, subset: str, split: str, out: Path) -> list:
    """Predictions made from the ground truth: the label PNGs at their split-relative paths."""
    videos = list_videos(resolve_root(synth_data, subset), subset, split)
    for video in videos:
        for i in video.annotated:
            target = out / video.mask_names[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(video.masks[i], target)
    return videos


def f_at_zero(area: float) -> float:
    """F of a frame when every pixel is predicted: precision = foreground fraction, recall = 1."""
    return 1.3 * area / (0.3 * area + 1)


# ------------------------------------------------------------------------------------------------- pred-dir
@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
@pytest.mark.parametrize("protocol", ["av2ts", "avsbench"])
def test_ground_truth_as_predictions_scores_one(synth_data, tmp_path, subset, protocol):
    videos = copy_labels(synth_data, subset, "test", tmp_path / "pred")
    report = eval_json("--subset", subset, "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred"),
                       "--protocol", protocol)
    perfect = 1.0
    if subset == "avss":  # the mean runs over all 71 classes: those absent from the split count as 0
        present = set().union(*(np.unique(np.asarray(Image.open(v.masks[i]))) for v in videos for i in v.annotated))
        assert 0 in present and len(present) >= 3
        perfect = len(present) / 71
    assert report["miou"] == pytest.approx(perfect, abs=1e-6) and report["fscore"] == pytest.approx(perfect, abs=1e-6)
    assert report["videos"] == {"s4": 3, "ms3": 2, "avss": 3}[subset]
    assert report["frames"] == {"s4": 15, "ms3": 10, "avss": 20}[subset]
    # the predictions are an input: metrics.json goes to a new runs/eval/expN, as for a model
    assert not (tmp_path / "pred" / "metrics.json").exists()
    assert report["metrics_file"] == str(Path("runs") / "eval" / "exp" / "metrics.json")
    saved = json.loads((tmp_path / "runs" / "eval" / "exp" / "metrics.json").read_text())
    assert saved["miou"] == report["miou"] and saved["protocol"] == protocol


def test_s4_degraded_predictions_score_the_hand_expected_values(synth_data, tmp_path):
    """Video 0's predictions blanked (all 0), the others exact."""
    videos = copy_labels(synth_data, "s4", "test", tmp_path / "pred")
    areas = []
    for path in videos[0].masks:
        truth = np.asarray(Image.open(path)) > 127
        areas.append(truth.mean())
        Image.fromarray(np.zeros(truth.shape, np.uint8)).save(tmp_path / "pred" / videos[0].mask_names[
            videos[0].masks.index(path)])
    assert all(a > 0 for a in areas)  # the synthetic S4 sounding object is always visible at these seeds
    other = sum(len(v.annotated) for v in videos[1:])
    blank_f = [f_at_zero(a) for a in areas]
    data = ["--subset", "s4", "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred")]

    report = eval_json(*data)
    assert report["miou"] == pytest.approx(other / (other + 5), abs=1e-6)  # blank frames: IoU 0
    assert report["fscore"] == pytest.approx((np.mean(blank_f) + 2) / 3, abs=1e-5)  # per-video max, then mean

    # one group of 3 videos: the mean curve is either its t = 0 point (every pixel predicted) or, for t > 0,
    # the exact frames' 1 over all 15 frames
    all_areas = areas + [(np.asarray(Image.open(v.masks[i])) > 127).mean() for v in videos[1:] for i in v.annotated]
    at_zero = np.mean([f_at_zero(a) for a in all_areas])
    report = eval_json(*data, "--protocol", "avsbench")
    assert report["fscore"] == pytest.approx(max(at_zero, other / (other + 5)), abs=1e-5)


def test_avss_all_background_predictions(synth_data, tmp_path):
    videos = list_videos(resolve_root(synth_data, "avss"), "avss", "test")
    background, f_background = [], []
    for video in videos:
        for i in video.annotated:
            labels = np.asarray(Image.open(video.masks[i]).resize((224, 224), Image.NEAREST))
            background.append((labels == 0).mean())
            f_background.append(f_at_zero((labels == 0).mean()))
            target = tmp_path / "pred" / video.mask_names[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((64, 64), np.uint8)).save(target)  # the label file's size: resized (nearest)
    data = ["--subset", "avss", "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred")]
    # background: IoU = its area fraction per frame; every sounding class: counted with IoU 0; mean over 71
    report = eval_json(*data)
    assert report["miou"] == pytest.approx(np.mean(background) / 71, abs=1e-9)
    assert report["fscore"] == pytest.approx(np.mean(f_background) / 71, abs=1e-9)
    padded = 10 - 5 + 10 - 5  # the v1s and v1m test clips are padded to 10 frames
    report = eval_json(*data, "--protocol", "avsbench")
    assert report["miou"] == pytest.approx((np.sum(background) + padded) / (len(background) + padded) / 71, abs=1e-9)
    assert report["frames"] == 20


# ---------------------------------------------------------------------------------------------------- models
def test_model_predictions_saved_and_rescored(synth_data, random_models, tmp_path, monkeypatch):
    data = ["--subset", "s4", "--data", str(synth_data), "--workers", "0"]
    report = eval_json(*data, "--model", str(random_models["s4"]), "--save-pred", str(tmp_path / "pred"),
                       "--batch", "2")
    assert report["videos"] == 3 and report["frames"] == 15 and 0 <= report["miou"] <= 1
    # the predictions lie at their labels' paths, in subfolders; metrics.json and metrics.png at the root
    files = sorted(p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.png")
                   if p.parent != tmp_path / "pred")
    assert (tmp_path / "pred" / "metrics.png").is_file()
    videos = list_videos(resolve_root(synth_data, "s4"), "s4", "test")
    assert files == sorted(name for v in videos for name in v.mask_names)
    image = Image.open(tmp_path / "pred" / files[0])
    assert image.mode == "L" and image.size == (64, 64)  # the label's size, not the model's input
    rescored = eval_json(*data, "--pred-dir", str(tmp_path / "pred"))
    assert rescored["miou"] == pytest.approx(report["miou"], abs=2e-3)  # probabilities stored as x/255
    assert rescored["fscore"] == pytest.approx(report["fscore"], abs=2e-2)

    assert rescored["metrics_file"] == str(Path("runs") / "eval" / "exp" / "metrics.json")  # not among the PNGs
    assert report["metrics_file"] == str(tmp_path / "pred" / "metrics.json")  # --save-pred's own output folder

    monkeypatch.chdir(tmp_path)  # without --save-pred, metrics.json goes to a new runs/eval/expN
    shuffled = eval_json(*data, "--model", str(random_models["s4"]), "--shuffle-audio")
    saved = json.loads((tmp_path / "runs" / "eval" / "exp2" / "metrics.json").read_text())
    assert shuffled["videos"] == 3 and saved["shuffle_audio"] is True and saved["miou"] == shuffled["miou"]


def test_avsegformer_protocol_scores_s4_at_512_against_upsampled_labels(synth_data, tmp_path):
    """--protocol avsegformer: S4 predictions at 512 x 512 equal to the labels upsampled with PIL's nearest (what
    AVSegFormer's loader does to its masks) score 1; a prediction at the label's size is one line naming both sizes;
    a model's map (here a hard one, the label itself) is scored and saved at 512 x 512 against the upsampled label."""
    from av2ts_cli.evaluate import _score_clip
    from av2ts_cli.metrics import BinaryMetrics, upsample_labels

    videos = list_videos(resolve_root(synth_data, "s4"), "s4", "test")
    for video in videos:
        for i in video.annotated:
            target = tmp_path / "pred" / video.mask_names[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(video.masks[i]).convert("L").resize((512, 512), Image.NEAREST).save(target)
    data = ["--subset", "s4", "--data", str(synth_data)]
    report = eval_json(*data, "--pred-dir", str(tmp_path / "pred"), "--protocol", "avsegformer")
    assert report["miou"] == pytest.approx(1.0, abs=1e-6) and report["fscore"] == pytest.approx(1.0, abs=1e-6)
    assert report["protocol"] == "avsegformer" and report["frames"] == 15

    copy_labels(synth_data, "s4", "test", tmp_path / "labels")
    first = videos[0].annotated[0]
    line = one_line_error(["eval", *data, "--pred-dir", str(tmp_path / "labels"), "--protocol", "avsegformer"])
    assert line == (f"error: {tmp_path / 'labels' / videos[0].mask_names[first]}: prediction is 64x64 but protocol "
                    f"avsegformer scores at 512x512 (its label {videos[0].masks[first]} upsampled)")

    # a model's side (evaluate_model's per-clip scoring): an AVSegFormer map is 512 x 512; one equal to the upsampled
    # label scores 1 under avsegformer (as is) and under av2ts (resized to 64: every 8 x 8 block is one label pixel)
    truth = torch.from_numpy((np.asarray(Image.open(videos[0].masks[first]).convert("L")) > 127).astype(np.int64))
    item = {"supervised": torch.tensor([True]), "masks": truth[None], "mask_paths": [videos[0].mask_names[first]]}
    big = upsample_labels(truth[None], 512)[0]
    semseg = torch.stack([1 - big, big]).float()[None]  # [T = 1, 2, 512, 512]
    for protocol, size in (("avsegformer", 512), ("av2ts", 64)):
        metric = BinaryMetrics()
        _score_clip(item, semseg, SimpleNamespace(subset="s4"), metric, protocol, tmp_path / protocol, None)
        assert metric.ious[0].tolist() == [pytest.approx(1.0, abs=1e-6)]
        assert Image.open(tmp_path / protocol / videos[0].mask_names[first]).size == (size, size)


def test_avss_model_with_mixed_clip_lengths_and_padding(synth_data, random_models, tmp_path):
    report = eval_json("--subset", "avss", "--data", str(synth_data), "--workers", "0", "--model",
                       str(random_models["avss"]), "--batch", "3", "--protocol", "avsbench", "--save-pred",
                       str(tmp_path / "pred"))
    assert report["frames"] == 20 and report["videos"] == 3
    details = json.loads((tmp_path / "pred" / "metrics.json").read_text())["details"]
    assert details["padded_frames"] == 10 and len(details["per_class"]["iou"]) == 71
    prediction = Image.open(next(p for p in (tmp_path / "pred").rglob("*.png") if p.parent != tmp_path / "pred"))
    assert prediction.mode == "P" and prediction.size == (224, 224)


def test_derangement():
    for n in (2, 3, 10):
        order = derangement(n, seed=4)
        assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))
        assert order == derangement(n, seed=4)


# ---------------------------------------------------------------------------------------------------- errors
def test_one_line_errors_name_the_file(synth_data, random_models, tmp_path):
    broken = shutil.copytree(synth_data / "AVSBench_object" / "Single-source", tmp_path / "Single-source")
    copy_labels(broken, "s4", "test", tmp_path / "pred")
    videos = list_videos(broken, "s4", "test")
    pred = ["--subset", "s4", "--data", str(broken), "--pred-dir", str(tmp_path / "pred")]

    missing_prediction = tmp_path / "pred" / videos[1].mask_names[2]
    missing_prediction.unlink()
    assert one_line_error(["eval", *pred]) == f"error: {missing_prediction}: missing prediction"
    missing_prediction.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert one_line_error(["eval", *pred]).startswith(f"error: {missing_prediction}: unreadable prediction PNG")

    videos[0].masks[0].write_bytes(videos[0].masks[0].read_bytes()[:50])  # corrupt ground truth
    assert one_line_error(["eval", *pred]).startswith(f"error: {videos[0].masks[0]}: unreadable mask")

    videos[2].frames[4].unlink()
    model = ["--subset", "s4", "--data", str(broken), "--model", str(random_models["s4"]), "--workers", "0",
             "--split", "test"]
    assert one_line_error(["eval", *model]).startswith(f"error: {videos[0].masks[0]}")  # first video first
    shutil.copy(synth_data / "AVSBench_object" / "Single-source" / videos[0].masks[0].relative_to(broken),
                videos[0].masks[0])
    assert one_line_error(["eval", *model]) == f"error: {videos[2].frames[4]}: missing frame"

    csv = broken / "s4_meta_data.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([line for line in lines if not line.endswith(",test")]) + "\n")
    assert one_line_error(["eval", *pred]) == f"error: {csv}: no videos in split 'test'"
    csv.unlink()
    assert one_line_error(["eval", *pred]) == f"error: {csv}: missing metadata CSV"


def test_usage_errors_exit_2(synth_data, tmp_path):
    base = ["eval", "--subset", "s4", "--data", str(synth_data)]
    assert "exactly one of --model and --pred-dir" in one_line_error(base, code=2)
    assert "--pred-dir" in one_line_error([*base, "--pred-dir", str(tmp_path), "--shuffle-audio"], code=2)
    assert "unknown protocol" in one_line_error([*base, "--pred-dir", str(tmp_path), "--protocol", "x"], code=2)


def _nan_checkpoint(source: Path, folder: Path, key: str = "decoder.class_embed.weight") -> Path:
    """A copy of a checkpoint whose tensor ``key`` is all NaN (its shapes and config intact: it loads)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    state = load_file(str(folder / "model.safetensors"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_a_model_whose_output_is_nan_is_an_error_naming_it(synth_data, random_models, tmp_path, monkeypatch):
    """NaN weights give a NaN semantic map: an error naming the model and the tensor, not a score of empty masks;
    nothing is written (no runs/eval, no --save-pred PNGs)."""
    monkeypatch.setenv("AV2TS_DEFORM_ATTN", "torch")  # the fallback: no kernel build (and its notice) in this cache
    nan = _nan_checkpoint(random_models["s4"], tmp_path / "nan-model")
    videos = list_videos(resolve_root(synth_data, "s4"), "s4", "test")
    line = one_line_error(["eval", "--subset", "s4", "--data", str(synth_data), "--workers", "0", "--model", str(nan),
                           "--save-pred", str(tmp_path / "pred")])
    assert line == (f"error: {nan}: the network's output is NaN or infinite on {videos[0].name}; 1 of its weight "
                    "tensors hold NaN or infinite values (decoder.class_embed.weight): a broken checkpoint")
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("pred/**/*.png"))


# ------------------------------------------------------------------------------------- pred-dir is an input
def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every entry under ``root`` (folders as (0, mtime))."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_a_prediction_of_another_size_names_the_file_and_both_sizes(synth_data, tmp_path, subset):
    videos = copy_labels(synth_data, subset, "test", tmp_path / "pred")
    video = videos[1]
    frame = video.annotated[-1]
    wrong = tmp_path / "pred" / video.mask_names[frame]
    Image.fromarray(np.zeros((48, 80), np.uint8)).save(wrong)  # 80 x 48, the label is 64 x 64
    before = _listing(tmp_path / "pred")
    line = one_line_error(["eval", "--subset", subset, "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred")])
    if subset == "s4":
        assert line == f"error: {wrong}: prediction is 80x48 but its label {video.masks[frame]} is 64x64"
    else:
        assert line == (f"error: {wrong}: prediction is 80x48 but its label {video.masks[frame]} is 64x64 (AVSS is "
                        "scored at 224x224; either size is accepted)")
    assert _listing(tmp_path / "pred") == before and not (tmp_path / "runs").exists()

    if subset == "avss":  # the scored size is accepted as well as the label's
        Image.fromarray(np.zeros((224, 224), np.uint8)).save(wrong)
        assert eval_json("--subset", "avss", "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred"))


def test_eval_pred_dir_writes_nothing_into_the_predictions(synth_data, tmp_path):
    copy_labels(synth_data, "ms3", "test", tmp_path / "pred")
    before = _listing(tmp_path / "pred")
    for run in (1, 2):  # each run its own runs/eval/expN
        result = invoke(["eval", "--subset", "ms3", "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred")])
        assert "1.0000" in result.output  # the metrics printed (the table)
        expected = Path("runs") / "eval" / ("exp" if run == 1 else "exp2") / "metrics.json"
        assert f"Results saved to {expected}" in result.output and (tmp_path / expected).is_file()
    assert _listing(tmp_path / "pred") == before


def test_metrics_are_printed_when_metrics_json_cannot_be_written(synth_data, tmp_path):
    """A file named runs where runs/eval/expN would go: the metrics still come out, then one error line, exit 1."""
    copy_labels(synth_data, "s4", "test", tmp_path / "pred")
    (tmp_path / "runs").write_text("not a folder")
    args = ["eval", "--subset", "s4", "--data", str(synth_data), "--pred-dir", str(tmp_path / "pred")]
    result = invoke([*args, "--json"], expect=1)
    report = json.loads(result.stdout)
    assert report["miou"] == pytest.approx(1.0) and report["metrics_file"] is None
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: metrics.json not saved: runs is a file, not a folder"]
    table = invoke(args, expect=1)
    assert "1.0000" in table.output and "Results saved" not in table.output
    assert table.output.strip().splitlines()[-1] == "error: metrics.json not saved: runs is a file, not a folder"
    assert (tmp_path / "runs").read_text() == "not a folder"


@pytest.mark.slow
def test_torchrun_eval_equals_one_process_to_the_last_bit(synth_data, random_models, tmp_path):
    """Two CPU processes (gloo) share the clips; the metrics equal a one-process eval exactly, for S4 under the
    avsbench protocol (F over groups of 4 consecutive videos: 9 videos, so the groups straddle the shards) and for
    AVSS with padding; rank 0 alone prints and writes metrics.json; each clip's prediction is written once."""
    s4 = tmp_path / "s4data"
    invoke(["data", "synth", "--subset", "s4", "--out", str(s4), "--videos", "1", "--val", "1", "--test", "9",
            "--size", "128", "--seed", "3", "--no-maskiges"])
    # S4 with the demo model (trained on synthetic S4): videos that score differently, so a merge in another order
    # gives other F groups
    models = {"s4": str(DEMO_MODEL_DIR), "avss": str(random_models["avss"])}
    cases = {"s4": ["--subset", "s4", "--data", str(s4)], "avss": ["--subset", "avss", "--data", str(synth_data)]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AV2TS_CACHE": str(tmp_path / "cache")}
    for subset, data in cases.items():
        common = ["eval", *data, "--model", models[subset], "--protocol", "avsbench", "--workers", "0"]
        # one thread in both runs: the forward's float sums follow the thread count
        one_process = subprocess.run([sys.executable, "-m", "av2ts_cli", *common, "--json", "--save-pred",
                                      str(tmp_path / f"one-{subset}")], capture_output=True, text=True, timeout=600,
                                     env=env, cwd=tmp_path)
        assert one_process.returncode == 0, one_process.stderr[-3000:]
        single = json.loads(one_process.stdout)
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "av2ts_cli", *common, "--json", "--save-pred", str(tmp_path / f"two-{subset}")],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)  # one document: rank 0's
        assert report["processes"] == 2
        assert {k: report[k] for k in ("miou", "fscore", "videos", "frames")} == \
            {k: single[k] for k in ("miou", "fscore", "videos", "frames")}
        one = json.loads((tmp_path / f"one-{subset}" / "metrics.json").read_text())["details"]
        two = json.loads((tmp_path / f"two-{subset}" / "metrics.json").read_text())["details"]
        assert one == two
        root = tmp_path / f"one-{subset}"  # the predictions, not metrics.png beside metrics.json at the root
        pngs = sorted(p.relative_to(root) for p in root.rglob("*.png") if p.parent != root)
        assert len(pngs) == single["frames"]
        assert all((tmp_path / f"one-{subset}" / p).read_bytes() == (tmp_path / f"two-{subset}" / p).read_bytes()
                   for p in pngs)
    assert single["videos"] == 3 and one["padded_frames"] == 10


def test_predictions_are_never_saved_into_the_data_or_the_model(synth_data, random_models, tmp_path):
    """--save-pred inside the dataset scored against, or inside the model, is refused before any work:
    the labels would be replaced and the next eval would score against its own output."""
    labels = resolve_root(synth_data, "s4")
    before = _listing(synth_data)
    inside = labels / "pred"
    line = one_line_error(["eval", "--subset", "s4", "--data", str(synth_data), "--model", str(random_models["s4"]),
                           "--save-pred", str(inside)], code=2)
    assert line == f"error: --save-pred {inside}: is inside --data {synth_data}, an input; write it elsewhere"
    model_inside = random_models["s4"] / "pred"
    line = one_line_error(["eval", "--subset", "s4", "--data", str(synth_data), "--model", str(random_models["s4"]),
                           "--save-pred", str(model_inside)], code=2)
    assert line == (f"error: --save-pred {model_inside}: is inside --model {random_models['s4']}, an input; write "
                    "it elsewhere")
    assert _listing(synth_data) == before and not model_inside.exists() and not (tmp_path / "runs").exists()
