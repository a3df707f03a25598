"""Mask outputs: COCO RLE (checked against pycocotools when it is installed), upsampling, PNG flavours, records."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from av2ts_cli.classes import AVSS_CLASSES, BINARY_CLASSES, avss_palette
from av2ts_cli.predict import masks as masks

HAVE_PYCOCOTOOLS = importlib.util.find_spec("pycocotools") is not None


def _random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (7, 1), (5, 7), (48, 64), (33, 200)]:
        for density in (0.0, 0.02, 0.5, 0.97, 1.0):
            yield rng.random(shape) < density
    blob = np.zeros((120, 160), bool)
    blob[30:90, 40:150] = True
    yield blob


def test_rle_round_trip_and_known_string():
    for mask in _random_masks():
        rle = masks.rle_encode(mask)
        assert rle["size"] == list(mask.shape)
        assert np.array_equal(masks.rle_decode(rle), mask)
        assert sum(masks.rle_counts(rle)) == mask.size
    # 2x2, column-major [1, 0, 1, 1]: runs 0,1,1,2 -> "0" "1" "1" then 2 - counts[1] = 1 -> "1"
    assert masks.rle_encode(np.array([[1, 1], [0, 1]], bool))["counts"] == "0111"


@pytest.mark.skipif(not HAVE_PYCOCOTOOLS, reason="pycocotools (dev extra) is not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 (__array__ copy keyword)
def test_rle_matches_pycocotools():
    from pycocotools import mask as coco_mask

    for mask in _random_masks():
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = masks.rle_encode(mask)
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert np.array_equal(coco_mask.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
        assert int(coco_mask.area(theirs)) == int(mask.sum())
        if mask.any():
            assert masks.bounding_box(mask) == [int(v) for v in coco_mask.toBbox(theirs)]


def test_bounding_box():
    mask = np.zeros((10, 20), bool)
    assert masks.bounding_box(mask) == [0, 0, 0, 0]
    mask[2:5, 7:11] = True
    assert masks.bounding_box(mask) == [7, 2, 4, 3]


@pytest.mark.parametrize("size", [(133, 97), (1, 1), (64, 64), (500, 17)])
def test_class_map_upsampling_equals_interpolate_then_argmax(size, monkeypatch):
    monkeypatch.setattr(masks, "_BAND_VALUES", 71 * size[0] * 3)  # force several bands
    scores = torch.randn(71, 28, 28)
    expected = F.interpolate(scores[None], size=size[::-1], mode="bilinear", align_corners=False)[0].argmax(0)
    assert np.array_equal(masks.upsample_class_map(scores, size), expected.numpy().astype(np.uint8))


def test_binary_frame_mask_thresholds_the_foreground_probability():
    scores = torch.zeros(2, 4, 4)
    scores[1, :, :2] = 3.0  # left half: softmax(0, 3) = 0.95
    mask = masks.frame_mask(scores, (8, 6), threshold=0.5)
    assert mask.classes.shape == (6, 8) and mask.probability.shape == (6, 8)
    assert mask.classes[:, :3].all() and not mask.classes[:, 5:].any()
    assert set(np.unique(masks.frame_mask(scores, (8, 6), threshold=0.99).classes)) == {0}


def test_png_flavours(tmp_path):
    binary = masks.FrameMask(np.array([[0, 1], [1, 0]], np.uint8))
    masks.write_mask_png(tmp_path / "b.png", binary, binary=True)
    with Image.open(tmp_path / "b.png") as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), [[0, 255], [255, 0]])
    semantic = masks.FrameMask(np.array([[0, 15], [64, 70]], np.uint8))
    masks.write_mask_png(tmp_path / "s.png", semantic, binary=False)
    with Image.open(tmp_path / "s.png") as image:
        assert image.mode == "P" and np.array_equal(np.asarray(image), semantic.classes)
        colours = np.asarray(image.convert("RGB"))
    assert colours[0, 1].tolist() == [192, 128, 128] and colours[1, 0].tolist() == [32, 0, 0]  # clipper, tuba
    assert np.array_equal(colours.reshape(-1, 3), avss_palette()[semantic.classes.ravel()])


def test_class_records():
    classes = np.zeros((10, 10), np.uint8)
    classes[0:2, 0:5] = 1
    classes[5:10, 5:10] = 17
    records = masks.class_records(masks.FrameMask(classes), AVSS_CLASSES, rle=True)
    assert [(r["id"], r["name"], r["pixels"], r["area"]) for r in records] == [(1, "accordion", 10, 0.1),
                                                                              (17, "dog", 25, 0.25)]
    assert records[1]["bbox"] == [5, 5, 5, 5]
    assert np.array_equal(masks.rle_decode(records[1]["segmentation"]), classes == 17)
    probability = np.full((10, 10), 0.25, np.float32)
    probability[classes == 1] = 0.75
    binary = masks.FrameMask((classes == 1).astype(np.uint8), probability)
    (record,) = masks.class_records(binary, BINARY_CLASSES, rle=False)
    assert record["score"] == 0.75 and "segmentation" not in record
    assert masks.class_records(masks.FrameMask(np.zeros((3, 3), np.uint8)), BINARY_CLASSES, rle=True) == []


def test_coco_writer_streams_a_loadable_file(tmp_path):
    path = tmp_path / "masks.coco.json"
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    with masks.CocoWriter(path, BINARY_CLASSES, [{"id": 0, "width": 4, "height": 3}], {"description": "t"}) as writer:
        assert not path.exists()  # only the temp file while writing
        writer.add(0, {"id": 1, "segmentation": masks.rle_encode(mask), "pixels": 2, "bbox": [1, 1, 2, 1]})
    doc = json.loads(path.read_text())
    assert doc["categories"] == [{"id": 1, "name": "sounding object"}]
    assert np.array_equal(masks.rle_decode(doc["annotations"][0]["segmentation"]), mask)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.coco.json"]
    with pytest.raises(KeyboardInterrupt), masks.CocoWriter(tmp_path / "other.json", BINARY_CLASSES, [], {}):
        raise KeyboardInterrupt  # an interrupted run: the temp is removed
    assert [p.name for p in tmp_path.iterdir()] == ["masks.coco.json"]
