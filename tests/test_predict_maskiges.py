"""av2ts_cli/predict_maskiges.py through ``av2ts predict``: a Siam model with no --maskiges makes the maskiges of
the sampled frames with the default generator (a tiny random SAM laid out as the pinned facebook/sam-vit-base in
a local Hugging Face cache, offline), caches them in the video's folder and reuses them on a re-run, an overlay
redo and --force; --fps makes its own set; a model without the Siam encoder never builds a generator; the
warning that compares train-time and predict-time maskiges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke_cli

from av2ts_cli import cli, media, predict
from av2ts_cli.config import get_preset
from av2ts_cli.errors import CheckpointError
from av2ts_cli.model import build_model
from av2ts_cli.predict import options
from av2ts_cli.predict.maskiges import AUTO, LazyGenerator, maskige_warning, parse_maskiges
from av2ts_cli.weights.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")  # the av2ts[sam] extra (part of dev)

from _tiny_sam import hub_cache_with, save_tiny_sam  # noqa: E402

from av2ts_cli.maskiges import generate  # noqa: E402
from av2ts_cli.maskiges.generate import DEFAULT_REPO, DEFAULT_REVISION  # noqa: E402


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and HF_HUB_OFFLINE for this test (huggingface_hub reads both at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def counted(monkeypatch):
    """How often a SAM model is loaded and a frame's masks generated (the real code runs; it is only counted)."""
    calls = {"loads": 0, "frames": 0}
    init, run = generate.MaskGenerator.__init__, generate.MaskGenerator.generate_many

    def counting_init(self, *args, **kwargs):
        calls["loads"] += 1
        init(self, *args, **kwargs)

    def counting_generate_many(self, images):
        calls["frames"] += len(images)
        return run(self, images)

    monkeypatch.setattr(generate.MaskGenerator, "__init__", counting_init)
    monkeypatch.setattr(generate.MaskGenerator, "generate_many", counting_generate_many)
    return calls


def _siam_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "s4", siam=True)
    save_checkpoint(build_model(cfg), cfg, folder)
    return folder


def _summary(run: Path, name: str) -> dict:
    return json.loads((run / name / "summary.json").read_text())


@pytest.mark.slow
def test_predict_makes_caches_and_reuses_the_maskiges_of_a_siam_model(make_clip, tmp_path, offline_hub, counted,
                                                                       monkeypatch):
    hub_cache_with(save_tiny_sam(tmp_path / "tiny-sam"), offline_hub, DEFAULT_REPO, DEFAULT_REVISION)
    model = _siam_checkpoint(tmp_path / "siam")
    clip = make_clip("siam talk", duration=2.0, size=(64, 48), pattern="testsrc")  # with sound
    run = tmp_path / "run"
    command = ["predict", str(clip), "--model", str(model), "--out", str(run), "--device", "cpu", "--overlay"]
    probed, probe = [], media.probe
    monkeypatch.setattr(media, "probe", lambda path, *a, **k: probed.append(Path(path)) or probe(path, *a, **k))
    # one route through predict: the sources collected once, --maskiges parsed once, one generator
    routes = {"collections": 0, "parses": 0, "generators": 0}
    collect, parse, make = cli.collect_videos, options.parse_maskiges, LazyGenerator.__init__

    def counted_call(key, function):
        def call(*args, **kwargs):
            routes[key] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(cli, "collect_videos", counted_call("collections", collect))
    monkeypatch.setattr(options, "parse_maskiges", counted_call("parses", parse))
    monkeypatch.setattr(LazyGenerator, "__init__", counted_call("generators", make))
    invoke_cli(command)
    assert probed.count(clip) == 1  # the maskiges' frames are decoded with predict's probe
    assert routes == {"collections": 1, "parses": 1, "generators": 1}
    folder = run / "siam talk"
    cache = folder / "maskiges" / "fps1"
    assert sorted(p.name for p in (folder / "masks").glob("*.png")) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in cache.glob("*.png")) == ["000000.png", "000001.png"]
    assert (folder / "overlay.mp4").is_file()
    summary = _summary(run, "siam talk")
    made = summary["maskiges"]
    assert (made["mode"], made["folder"], made["written"], made["reused"]) == (AUTO, str(cache), 2, 0)
    assert (made["repo"], made["revision"], made["model_type"]) == (DEFAULT_REPO, DEFAULT_REVISION, "sam")
    assert made["settings"]["points_per_side"] == 32 and made["settings"]["pred_iou_thresh"] == 0.88
    assert made["geometry"]["name"] == "square-224"  # an S4 model: the generator saw the 224 x 224 squash
    assert any("training maskiges are not recorded" in w for w in summary["warnings"])
    assert counted == {"loads": 1, "frames": 2}
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.png")}

    invoke_cli(command)  # finished: skipped whole, no SAM loaded
    assert counted == {"loads": 1, "frames": 2}
    invoke_cli([*command, "--force"])  # redone (an overlay redo is the same): the maskiges come from the cache
    assert counted == {"loads": 1, "frames": 2}
    assert _summary(run, "siam talk")["maskiges"]["reused"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.png")} == mtimes

    invoke_cli([*command, "--fps", "2"])  # other frames: their own set, the first one kept
    assert counted == {"loads": 2, "frames": 6}
    assert len(list((folder / "maskiges" / "fps2").glob("*.png"))) == 4 and len(list(cache.glob("*.png"))) == 2
    invoke_cli(command)  # back to --fps 1: nothing to make
    assert counted == {"loads": 2, "frames": 6}


def test_a_missing_default_generator_offline_is_one_error_naming_it(make_clip, tmp_path, offline_hub):
    model = _siam_checkpoint(tmp_path / "siam")
    clip = make_clip("siam", duration=2.0, size=(40, 30))
    with pytest.raises(CheckpointError, match=f"{DEFAULT_REPO}.*hf download {DEFAULT_REPO}"):
        predict.run([clip], predict.PredictOptions(model=str(model), out=tmp_path / "run", progress=False,
                                                   device="cpu"))


def test_models_without_the_siam_encoder_never_build_a_generator(make_clip, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a maskige generator was built for a model without the Siam encoder")

    monkeypatch.setattr(LazyGenerator, "__init__", refuse)
    monkeypatch.setattr(generate.MaskGenerator, "__init__", refuse)
    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "s4")
    model = save_checkpoint(build_model(cfg), cfg, tmp_path / "plain")
    clip = make_clip("plain", duration=2.0, size=(40, 30))
    report = predict.run([clip], predict.PredictOptions(model=str(model), out=tmp_path / "run", progress=False,
                                                        device="cpu", generator="hf://nobody/nothing"))
    summary = _summary(tmp_path / "run", "plain")
    assert report.videos[0].frames == 2 and summary["maskiges"] is None and summary["settings"]["maskiges"] is None
    assert not (tmp_path / "run" / "plain" / "maskiges").exists()


def test_the_maskiges_option():
    assert parse_maskiges(None) == AUTO and parse_maskiges("auto") == AUTO
    assert parse_maskiges("./auto") == Path("auto") and parse_maskiges("some/dir") == Path("some/dir")


def test_train_and_predict_maskiges_are_compared():
    sam = {"generator": "hf://facebook/sam-vit-base@abc", "repo": "facebook/sam-vit-base",
           "revision": "a" * 40, "model_type": "sam", "settings": {"points_per_side": 32, "points_per_batch": 64}}
    trained = {"subset": "s4", "maskiges": {"source": "generator", **sam}}
    assert maskige_warning(trained, sam) is None
    faster = {**sam, "settings": {"points_per_side": 32, "points_per_batch": 16}}  # same masks, less memory
    assert maskige_warning(trained, faster) is None
    coarser = {**sam, "settings": {"points_per_side": 16, "points_per_batch": 64}}
    assert "trained on maskiges by facebook/sam-vit-base@aaaaaaaaaaaa (32 points" in maskige_warning(trained, coarser)
    converted = "unknown: converted from the COMBO reference checkpoint model.pth"
    assert "Semantic-SAM" in maskige_warning(converted, sam)
    assert "Semantic-SAM" in maskige_warning({"maskiges": {"source": "unknown"}}, sam)
    from_masks = {"maskiges": {"source": "masks-from", "masks_from": "/data/masks"}}
    assert "/data/masks" in maskige_warning(from_masks, sam)
    assert maskige_warning(trained, {"mode": "folder", "folder": "x", "generator": None}) is None  # unknown here


def test_a_lazy_generator_describes_itself_without_loading(tmp_path, counted):
    folder = save_tiny_sam(tmp_path / "tiny")
    lazy = LazyGenerator(str(folder), {"points_per_side": 4, "pred_iou_thresh": 0.0}, "cpu")
    description = lazy.describe()
    assert counted["loads"] == 0 and lazy.loaded is None
    masks = lazy.generate(np.zeros((48, 64, 3), np.uint8))
    assert masks.dtype == bool and masks.shape[1:] == (48, 64) and counted == {"loads": 1, "frames": 1}
    assert description == lazy.loaded.describe()  # what a cache check compares is what the loaded model says


def test_maskiges_of_another_geometry_are_warned_about():
    from av2ts_cli.predict.maskiges import geometry_warning

    assert geometry_warning({"geometry": {"name": "square-224"}}, "square-224") is None
    assert geometry_warning({"mode": "folder", "generator": None}, "square-224") is None  # unknown: nothing said
    warning = geometry_warning({"geometry": {"name": "source-224"}}, "square-224")
    assert "source-224" in warning and "squashed to 224x224" in warning


@pytest.mark.slow
def test_a_vct_model_gets_vct_maskiges_and_its_frames_at_384(make_clip, tmp_path, offline_hub, monkeypatch):
    """VCT's kind end to end through predict (spec vct.md section 1) with the tiny SAM as the default generator: a
    VCT checkpoint (vct-tiny's wiring at vct-swinb's 384 px, the Siam encoder on) gets maskiges made by the
    generator from the frame at its source size (80 x 48 here), whose id map is resized to 384 x 384 nearest, and
    the frames squashed to 384 x 384; the summary records the source-384 geometry and warns about none."""
    import dataclasses

    from PIL import Image

    from av2ts_cli.maskiges.render import id_map
    from av2ts_cli.predictor import Predictor

    hub_cache_with(save_tiny_sam(tmp_path / "tiny-sam"), offline_hub, DEFAULT_REPO, DEFAULT_REVISION)
    tiny = get_preset("vct-tiny", "s4", siam=True)
    cfg = dataclasses.replace(tiny, input_size=384, backbone_kwargs={**tiny.backbone_kwargs, "img_size": 384})
    torch.manual_seed(0)
    model = save_checkpoint(build_model(cfg), cfg, tmp_path / "vct")
    clip = make_clip("vct talk", duration=2.0, size=(80, 48), pattern="testsrc")
    made, fed = [], []
    run_generate, run_segment = generate.MaskGenerator.generate_many, Predictor.segment_pictures

    def recording_generate(self, images):
        out = []
        for image, masks in zip(images, run_generate(self, images), strict=True):
            # the random tiny SAM keeps no mask at the default thresholds: two rectangles make the id map worth
            # comparing
            boxes = np.zeros((2, *image.shape[:2]), bool)
            boxes[0, 5:30, 10:50], boxes[1, 20:45, 30:75] = True, True
            masks = np.concatenate([masks.astype(bool), boxes])
            made.append((image.shape, masks))
            out.append(masks)
        return out

    def recording_segment(self, frames, audio, maskiges=None):
        fed.append((frames.shape, None if maskiges is None else maskiges.shape))
        return run_segment(self, frames, audio, maskiges)

    monkeypatch.setattr(generate.MaskGenerator, "generate_many", recording_generate)
    monkeypatch.setattr(Predictor, "segment_pictures", recording_segment)
    run = tmp_path / "run"
    invoke_cli(["predict", str(clip), "--model", str(model), "--out", str(run), "--device", "cpu",
                "--points-per-side", "8"])
    summary = _summary(run, "vct talk")
    assert summary["maskiges"]["geometry"]["name"] == "source-384" and summary["maskiges"]["written"] == 2
    assert not any("geometry" in w for w in summary["warnings"])
    assert [shape for shape, _ in made] == [(48, 80, 3)] * 2  # the generator saw the source-size frames
    cache = run / "vct talk" / "maskiges" / "fps1"
    for index, (_, masks) in enumerate(made):
        picture = Image.open(cache / f"{index:06d}.png")
        expected = Image.fromarray(id_map(masks)).resize((384, 384), Image.NEAREST)
        assert picture.size == (384, 384) and (np.asarray(picture) == np.asarray(expected)).all(), index
    assert fed and all(frames[2:] == (384, 384, 3) and maskiges[2:] == (384, 384, 3) for frames, maskiges in fed)
