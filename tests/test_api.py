"""api.py, the Python API: the README's example runs and gives `av2ts predict`'s masks pixel for pixel, the
array entry point gives the masks of the video stream for the same inputs, and bad names, options and shapes are
one-line errors (before any work)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke_cli
from PIL import Image

from av2ts_cli import api, media, sampling
from av2ts_cli.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo.mp4"
EXAMPLE_MARK = "<!-- python-api-example -->"


def readme_example() -> str:
    """The Python block right after the README's example mark."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(EXAMPLE_MARK) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, f"README.md: no ```python block after {EXAMPLE_MARK}"
    return found.group(1)


@pytest.fixture(scope="module")
def demo_model() -> api.Model:
    return api.load_model("demo", device="cpu", precision="fp32")


def test_the_readme_example_prints_the_masks_of_av2ts_predict(tmp_path, monkeypatch, capsys):
    seen: list[api.FrameResult] = []  # what the example's loop received, recorded on the way
    predict = api.Model.predict

    def recorded(self, *args, **kwargs):
        for result in predict(self, *args, **kwargs):
            seen.append(result)
            yield result

    monkeypatch.setattr(api.Model, "predict", recorded)
    monkeypatch.chdir(ROOT)  # the example names assets/demo.mp4, as run from a clone
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()

    invoke_cli(["predict", str(DEMO), "--out", str(tmp_path / "run"), "--format", "png,json"])
    folder = tmp_path / "run" / "demo"
    records = [json.loads(line) for line in (folder / "frames.jsonl").read_text().splitlines()]
    assert len(seen) == len(records) == len(printed) == 15
    for result, record, line in zip(seen, records, printed, strict=True):
        png = np.asarray(Image.open(folder / record["mask"]))
        assert np.array_equal(png, result.mask * np.uint8(255)), record["mask"]  # pixel for pixel
        assert (result.index, result.time) == (record["index"], record["time"])
        assert json.loads(json.dumps(result.classes)) == record["classes"]
        # the line the example printed, made from the CLI's outputs
        found = ", ".join(f"{c['name']} ({c['score']:.2f}) at {c['bbox']}" for c in record["classes"]) or "silence"
        assert line == f"{record['time']:5.2f} s  {png.shape}  {found}"
    assert sum(result.sounding for result in seen) == json.loads((folder / "summary.json").read_text())[
        "sounding_frames"]


def test_arrays_give_the_masks_of_the_video_stream(demo_model):
    """The first window of the demo, decoded by hand, through ``segment`` and ``masks``: the masks ``predict``
    gives for those frames; log-mel examples and the wave they come from give the same maps, and one clip equals a
    batch of one."""
    frames_per_window = demo_model.config.num_frames
    streamed = [r for _, r in zip(range(frames_per_window), demo_model.predict(DEMO), strict=False)]
    info = media.probe(DEMO)
    schedule = sampling.video_schedule(info, 1, frames_per_window)
    window = schedule.windows[0]
    size = demo_model.config.input_size
    frames = np.stack([frame for _, frame in media.iter_frames_at(DEMO, [f.time for f in window.frames],
                                                                  (size, size), info=info)])
    wave = media.decode_audio(DEMO)
    examples = schedule.window_audio(wave, window)

    maps = demo_model.segment(frames, examples)  # one clip: [T, H, W, 3] and [T, 96, 64]
    assert maps.shape == (frames_per_window, 2, size, size) and maps.dtype == torch.float32
    masks = demo_model.masks(maps, size=(info.width, info.height))
    assert masks.shape == (frames_per_window, info.height, info.width) and masks.dtype == np.uint8
    for mask, result in zip(masks, streamed, strict=True):
        assert np.array_equal(mask, result.mask), result.index
    batch = demo_model.segment(frames[None], wave[None, :16000 * frames_per_window])  # a batch of one, its wave
    assert batch.shape == (1, *maps.shape) and torch.equal(batch[0], maps)
    larger = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # any size: resized to S x S as eval resizes
    assert demo_model.segment(larger, examples).shape == maps.shape


def test_a_preset_is_a_random_network_of_its_subset():
    model = api.load_model("av2ts-tiny", device="cpu", subset="avss")
    assert model.config.num_classes == 71 and len(model.classes) == 71 and model.classes[0] == "background"
    assert isinstance(model.network, torch.nn.Module) and "av2ts-tiny" in repr(model)


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_bad_names_options_and_shapes_are_one_line_errors(demo_model, tmp_path):
    with pytest.raises(UsageError) as err:
        api.load_model("no-such-model")
    _one_line(err, "no-such-model", "av2ts models")
    with pytest.raises(UsageError) as err:
        api.load_model("demo", precision="fp8")
    _one_line(err, "fp8", "fp32")
    with pytest.raises(UsageError) as err:  # said at the call, before any video is opened
        demo_model.predict(tmp_path / "missing.mp4")
    _one_line(err, "missing.mp4", "no such file")
    with pytest.raises(UsageError) as err:
        demo_model.predict(DEMO, fps=0)
    _one_line(err, "--fps 0")

    frames = np.zeros((5, 64, 64, 3), np.uint8)
    examples = torch.zeros(5, 96, 64)
    cases = [
        ((frames.astype(np.float32), examples), ("frames: expected uint8 RGB", "float32 [5, 64, 64, 3]")),
        ((frames[..., 0], examples), ("frames:", "[5, 64, 64]")),
        ((frames, torch.zeros(4, 96, 64)), ("audio: expected [5, 96, 64]", "[4, 96, 64]")),
        ((frames[None], torch.zeros(2, 16000)), ("audio:", "[1, 5, 96, 64]", "[2, 16000]")),
        ((frames, examples, frames), ("maskiges:", "no Siam encoder")),
        (([[0]], examples), ("frames: expected a numpy array or torch tensor", "list")),
    ]
    for args, fragments in cases:
        with pytest.raises(UsageError) as err:
            demo_model.segment(*args)
        _one_line(err, *fragments)
    with pytest.raises(UsageError) as err:
        demo_model.masks(torch.zeros(5, 3, 8, 8))
    _one_line(err, "maps:", "K = 2")


def test_a_siam_model_streams_with_maskiges_made_in_a_temporary_folder(make_clip, tmp_path):
    """``maskiges="auto"`` (the default) makes them with the generator, as predict does, in a temporary folder that
    is gone afterwards: the masks equal predict's with the same generator, and nothing is left on disk."""
    import tempfile

    from _tiny_sam import save_tiny_sam

    from av2ts_cli.config import get_preset
    from av2ts_cli.model import build_model
    from av2ts_cli.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "s4", siam=True)
    checkpoint = tmp_path / "siam"
    save_checkpoint(build_model(cfg), cfg, checkpoint)
    generator = save_tiny_sam(tmp_path / "tiny-sam")
    clip = make_clip("api siam", duration=2.0, size=(64, 48), pattern="testsrc")
    model = api.load_model(checkpoint, device="cpu", precision="fp32")
    before = set(Path(tempfile.gettempdir()).glob("av2ts-maskiges-*"))
    with pytest.warns(UserWarning, match="training maskiges are not recorded"):
        results = list(model.predict(clip, generator=str(generator), points_per_side=4))
    assert set(Path(tempfile.gettempdir()).glob("av2ts-maskiges-*")) == before
    invoke_cli(["predict", str(clip), "--model", str(checkpoint), "--out", str(tmp_path / "run"), "--device", "cpu",
                "--precision", "fp32", "--generator", str(generator), "--points-per-side", "4", "--format", "png"])
    pngs = sorted((tmp_path / "run" / "api siam" / "masks").glob("*.png"))
    assert len(results) == len(pngs) == 2
    for result, png in zip(results, pngs, strict=True):
        assert np.array_equal(np.asarray(Image.open(png)), result.mask * np.uint8(255)), png.name
    with pytest.raises(UsageError) as err:
        model.segment(np.zeros((5, 32, 32, 3), np.uint8), torch.zeros(5, 96, 64))
    _one_line(err, "maskiges:", "Siam encoder")


def test_train_and_evaluate_are_the_commands_own_functions():
    """One way to do each thing: the API's train and evaluate are what `av2ts train` and `av2ts eval` call."""
    from av2ts_cli import evaluate, training

    assert api.train is training.train and api.evaluate is evaluate.evaluate
