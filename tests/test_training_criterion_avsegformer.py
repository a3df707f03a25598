"""av2ts_cli/training/criterion_avsegformer.py: AVSegFormer's losses on small tensors computed by hand (the
reference's Dice with its 0.001 terms, S4's frame 0 against MS3's every frame, AVSS's cross-entropy masked by the
temporal flag, the mix loss and its 0.1 weight), and ``build_criterion``'s choice for the family."""

from __future__ import annotations

import math

import pytest
import torch

from av2ts_cli.config import get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.training.criterion import SetCriterion, build_criterion
from av2ts_cli.training.criterion_avsegformer import MIX_WEIGHT, AVSegFormerCriterion

LN3 = math.log(3.0)  # a logit whose sigmoid is 0.75


def _features(mean_logit: float, frames: int) -> torch.Tensor:
    """Mask features [frames, 2, 1, 1] whose channel mean is ``mean_logit`` (upsampled: that value everywhere)."""
    return torch.tensor([mean_logit - 1.0, mean_logit + 1.0]).view(1, 2, 1, 1).repeat(frames, 1, 1, 1)


def _binary_case():
    """One clip of 2 frames of 2 x 2 pixels; logits 0 (p = 0.5); frame 0 labels one pixel, frame 1 all four."""
    logits = torch.zeros(2, 1, 2, 2)
    masks = torch.tensor([[[[1, 0], [0, 0]], [[1, 1], [1, 1]]]])  # [B=1, T=2, 2, 2]
    return {"logits": logits, "mask_features": _features(LN3, 2)}, masks


def test_dice_on_frame_0_for_s4_and_every_frame_for_ms3():
    outputs, masks = _binary_case()
    criterion = AVSegFormerCriterion(num_classes=2)
    # p = 0.5: frame 0 sum(pg) = 0.5, sum(p^2) = 1, sum(g^2) = 1; frame 1 sum(pg) = 2, sum(p^2) = 1, sum(g^2) = 4
    frame0 = 1 - 2 * 0.5 / ((1 + 0.001) + (1 + 0.001))
    frame1 = 1 - 2 * 2.0 / ((1 + 0.001) + (4 + 0.001))
    # the mix loss: p = sigmoid(ln 3) = 0.75 everywhere; frame 0 sum(pg) = 0.75, sum(p^2) = 2.25; frame 1 3, 2.25
    mix0 = 1 - 2 * 0.75 / ((2.25 + 0.001) + (1 + 0.001))
    mix1 = 1 - 2 * 3.0 / ((2.25 + 0.001) + (4 + 0.001))

    s4 = criterion(outputs, {"masks": masks, "supervised": torch.tensor([[True, False]])})  # S4 train: frame 0
    assert set(s4) == {"loss_dice", "loss_mix"}
    assert s4["loss_dice"].item() == pytest.approx(frame0, abs=1e-6)
    assert s4["loss_mix"].item() == pytest.approx(0.1 * mix0, abs=1e-6)

    ms3 = criterion(outputs, {"masks": masks, "supervised": torch.tensor([[True, True]])})  # MS3: every frame
    assert ms3["loss_dice"].item() == pytest.approx((frame0 + frame1) / 2, abs=1e-6)
    assert ms3["loss_mix"].item() == pytest.approx(0.1 * (mix0 + mix1) / 2, abs=1e-6)


def test_the_mix_loss_weight_is_the_references_0_1():
    outputs, masks = _binary_case()
    supervised = torch.tensor([[True, True]])
    weighted = AVSegFormerCriterion(2)(outputs, {"masks": masks, "supervised": supervised})["loss_mix"]
    unweighted = AVSegFormerCriterion(2, mix_weight=1.0)(outputs, {"masks": masks, "supervised": supervised})
    assert MIX_WEIGHT == 0.1
    assert weighted.item() == pytest.approx(0.1 * unweighted["loss_mix"].item(), rel=1e-6)


def test_masked_cross_entropy_ignores_the_frames_the_flag_leaves_out():
    """AVSS, 3 classes, one clip of 2 frames of 1 x 2 pixels: frame 1 is a padded slot (flag 0) with wild logits."""
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 0, 0, 1] = math.log(2.0)  # pixel 1 of frame 0: softmax (2, 1, 1) / 4
    logits[1] = torch.tensor([50.0, -50.0, 0.0]).view(3, 1, 1)  # the padded slot: any value, it must not count
    masks = torch.tensor([[[[0, 0]], [[2, 1]]]])  # frame 1's labels would cost ~100 each
    outputs = {"logits": logits, "mask_features": _features(0.0, 2)}
    criterion = AVSegFormerCriterion(num_classes=3)
    losses = criterion(outputs, {"masks": masks, "supervised": torch.tensor([[True, False]])})
    assert set(losses) == {"loss_ce", "loss_mix"}
    # pixel 0: uniform over 3 classes, label 0 -> ln 3; pixel 1: p(0) = 2/4 -> ln 2; the frame's mean
    assert losses["loss_ce"].item() == pytest.approx((LN3 + math.log(2.0)) / 2, abs=1e-6)
    # the mix loss's target is label > 0: nothing in frame 0; p = 0.5 on 2 pixels: 1 - 0 / (0.5 + 0.001 + 0.001)
    assert losses["loss_mix"].item() == pytest.approx(0.1 * 1.0, abs=1e-6)

    both = criterion(outputs, {"masks": masks, "supervised": torch.tensor([[True, True]])})
    assert both["loss_ce"].item() > 20  # the flag is what kept frame 1 out

    # a pixel without a label (255) adds 0; by default it still counts in the frame's mean, with ignore_padding not
    masks[0, 0, 0, 1] = 255
    flagged = {"masks": masks, "supervised": torch.tensor([[True, False]])}
    assert criterion(outputs, flagged)["loss_ce"].item() == pytest.approx(LN3 / 2, abs=1e-6)
    ignoring = AVSegFormerCriterion(num_classes=3, ignore_padding=True)
    assert ignoring(outputs, flagged)["loss_ce"].item() == pytest.approx(LN3, abs=1e-6)


def test_nothing_flagged_gives_zeros_that_keep_the_graph():
    outputs, masks = _binary_case()
    outputs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    losses = AVSegFormerCriterion(2)(outputs, {"masks": masks, "supervised": torch.zeros(1, 2, dtype=torch.bool)})
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert outputs["logits"].grad is not None and not outputs["logits"].grad.any()


def test_shapes_are_checked():
    outputs, masks = _binary_case()
    criterion = AVSegFormerCriterion(num_classes=71)
    with pytest.raises(UsageError, match=r"logits must be \[B\*T, O, H, W\] = \[2, 71"):
        criterion(outputs, {"masks": masks, "supervised": torch.ones(1, 2, dtype=torch.bool)})
    with pytest.raises(UsageError, match="supervised"):
        AVSegFormerCriterion(2)(outputs, {"masks": masks, "supervised": torch.ones(2, dtype=torch.bool)})


def test_build_criterion_gives_the_family_its_own_loss_and_a_real_step_trains_the_head_only():
    cfg = get_preset("avsegformer-tiny", "s4")
    criterion = build_criterion(cfg)
    assert isinstance(criterion, AVSegFormerCriterion) and criterion.channels == 1
    assert isinstance(build_criterion(get_preset("avsegformer-tiny", "avss")), AVSegFormerCriterion)
    assert isinstance(build_criterion(get_preset("combo-tiny", "s4")), SetCriterion)

    from av2ts_cli.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.freeze_backbone(True)
    outputs = model(torch.rand(1, 2, 3, 64, 64) * 255, torch.randn(1, 2, 96, 64))
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.int64)
    masks[..., 16:40, 20:44] = 1
    losses = criterion(outputs, {"masks": masks, "supervised": torch.tensor([[True, False]])})
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.audio_encoder.parameters())
    assert model.audio_proj.weight.grad is not None and model.head.fc[0].weight.grad.abs().sum() > 0
