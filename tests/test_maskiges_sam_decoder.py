"""av2ts_cli/maskiges/sam_decoder.py: the point decoder gives transformers' SamModel's masks and IoU scores (random
weights, the tiny test model and a decoder of the published size), and the generator's bf16 path gives the fp32
path's masks (matched by IoU) on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny_sam import save_tiny_sam  # noqa: E402

from av2ts_cli.maskiges.generate import GeneratorSettings, MaskGenerator  # noqa: E402
from av2ts_cli.maskiges.sam_decoder import PointDecoder  # noqa: E402


def _published_decoder_model():
    """A SamModel whose prompt encoder and mask decoder have SAM's published sizes (256 wide, 64 x 64 image
    tokens, 8 heads; the same in ViT-B, -L and -H), with a one-block vision encoder (not run here)."""
    torch.manual_seed(3)
    config = transformers.SamConfig()
    config.vision_config.num_hidden_layers = 1
    return transformers.SamModel(config).eval()


def _compare(model, embeddings, points, labels, multimask: bool):
    with torch.inference_mode():
        stock = model(image_embeddings=embeddings, input_points=points, input_labels=labels,
                      multimask_output=multimask)
        logits, iou = PointDecoder(model).decode(embeddings, points, labels, multimask)
    assert logits.shape == stock.pred_masks.shape and iou.shape == stock.iou_scores.shape
    scale = stock.pred_masks.abs().max().item()
    assert (logits - stock.pred_masks).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert (iou - stock.iou_scores).abs().max().item() <= 1e-5


@pytest.mark.parametrize("multimask", [True, False])
def test_the_point_decoder_equals_the_stock_decoder_at_the_published_size(multimask):
    model = _published_decoder_model()
    side = model.config.prompt_encoder_config.image_embedding_size
    embeddings = torch.randn(1, model.config.mask_decoder_config.hidden_size, side, side)
    points = torch.rand(1, 6, 1, 2) * model.config.prompt_encoder_config.image_size
    points[0, 0, 0] = 0.0  # a corner, and a background label: the label embeddings differ
    labels = torch.ones(1, 6, 1, dtype=torch.long)
    labels[0, 1, 0] = 0
    _compare(model, embeddings, points, labels, multimask)


def test_the_point_decoder_equals_the_stock_decoder_on_the_tiny_model(tmp_path):
    model = transformers.SamModel.from_pretrained(save_tiny_sam(tmp_path / "sam")).eval()
    torch.manual_seed(0)
    side = model.config.prompt_encoder_config.image_embedding_size
    embeddings = torch.randn(1, model.config.mask_decoder_config.hidden_size, side, side) * 3
    points = torch.rand(1, 9, 1, 2) * model.config.prompt_encoder_config.image_size
    _compare(model, embeddings, points, torch.ones(1, 9, 1, dtype=torch.long), True)


def test_the_generator_uses_it_for_sam_and_keeps_the_stock_path_elsewhere(tmp_path):
    generator = MaskGenerator(save_tiny_sam(tmp_path / "sam"), GeneratorSettings(points_per_side=2), "cpu", "fp32")
    assert isinstance(generator.point_decoder, PointDecoder)
    hq = MaskGenerator(save_tiny_sam(tmp_path / "hq", hq=True), GeneratorSettings(points_per_side=2), "cpu", "fp32")
    assert hq.point_decoder is None


def _matched_iou(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each reference mask (bool [N, H, W]), its best IoU with any of ``ours`` (bool [M, H, W])."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = ours.reshape(len(ours), -1).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return (inter / np.maximum(union, 1)).max(1)


def test_bf16_masks_match_the_fp32_masks(tmp_path):
    """The same frame through the generator in fp32 and in bf16 (weights cast once, thresholds in fp32): each fp32
    mask is found again among the bf16 ones (median best IoU >= 0.85, where another model's masks reach 0.53), and
    the record names the precision."""
    folder = save_tiny_sam(tmp_path / "sam", seed=1)
    settings = GeneratorSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 box_nms_thresh=1.0, min_region=0)  # every proposal kept: 108 masks
    rng = np.random.default_rng(0)
    image = np.zeros((48, 64, 3), np.uint8)
    image[8:30, 10:40] = (220, 40, 40)  # two flat regions on a noisy ground: masks a model can agree on
    image[28:44, 36:60] = (30, 200, 60)
    image += rng.integers(0, 20, image.shape, dtype=np.uint8)
    full = MaskGenerator(folder, settings, "cpu", "fp32")
    half = MaskGenerator(folder, settings, "cpu", "bf16")
    assert full.describe()["precision"] == "fp32" and half.describe()["precision"] == "bf16"
    assert next(half.model.parameters()).dtype == torch.bfloat16
    reference, ours = full.generate(image), half.generate(image)
    assert len(reference) >= 50 and len(ours) >= 50
    matched = _matched_iou(ours, reference)
    # random weights leave many logits near the threshold, so bf16 flips some pixels (median here 0.90); what the
    # bar separates from is a different model's masks of the same frame (median 0.53: large masks overlap anyway)
    other = MaskGenerator(save_tiny_sam(tmp_path / "other", seed=2), settings, "cpu", "fp32").generate(image)
    assert np.median(matched) >= 0.85 > 0.7 >= np.median(_matched_iou(other, reference)), matched
