"""Tests of av2ts_cli/training/criterion.py: the matcher, each loss term against hand computations, which pixels and
frames are supervised, deep supervision, gradients, and an optimisation of free tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from av2ts_cli.config import LossConfig, get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.training.criterion import (
    HungarianMatcher,
    SetCriterion,
    build_criterion,
    dice_loss,
    inter_frame_cosine_loss,
    pairwise_bce_cost,
    pairwise_dice_cost,
    point_sample,
    semantic_targets,
    sigmoid_bce_loss,
    uncertain_point_coords,
)

SET_KEYS = ("loss_ce", "loss_mask", "loss_dice")


def small_loss(**changes) -> LossConfig:
    return LossConfig(**{"num_points": 256, **changes})


def block_targets(b: int, t: int, size: int = 32, num_classes: int = 3, seed: int = 0) -> torch.Tensor:
    """int64 [B, T, size, size]: each frame a background (0) with one or two class blocks aligned to 4x4 cells."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, t, size, size, dtype=torch.int64)
    for i in range(b):
        for j in range(t):
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                cls = int(torch.randint(1, num_classes, (1,), generator=g))
                y, x = (torch.randint(0, size // 8, (2,), generator=g) * 4).tolist()
                h, w = (torch.randint(2, size // 8 + 1, (2,), generator=g) * 4).tolist()
                masks[i, j, y:y + h, x:x + w] = cls
    return masks


def free_outputs(n: int, q: int, k: int, side: int, aux: int = 0, middle: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def layer():
        return {"pred_logits": torch.randn(n, q, k + 1, generator=g).requires_grad_(),
                "pred_masks": torch.randn(n, q, side, side, generator=g).requires_grad_()}

    out = layer()
    out["aux_outputs"] = [layer() for _ in range(aux)]
    out["middle_masks"] = [torch.randn(n, q, side * side, generator=g).requires_grad_() for _ in range(middle)]
    return out


def run(criterion, outputs, masks, supervised=None, seed=0) -> dict[str, torch.Tensor]:
    if supervised is None:
        supervised = torch.ones(masks.shape[:2], dtype=torch.bool)
    torch.manual_seed(seed)
    return criterion(outputs, {"masks": masks, "supervised": supervised})


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def test_point_sample_reads_pixel_centres_at_any_resolution():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    coords = torch.tensor([[[0.125, 0.125], [0.625, 0.375], [0.875, 0.875]]])  # (x, y) of pixel centres
    assert point_sample(image, coords).flatten().tolist() == [0.0, 6.0, 15.0]
    # the same normalised point on a 4x finer copy of the image reads the same value
    fine = image.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.allclose(point_sample(fine, coords), point_sample(image, coords))


def test_bce_and_dice_on_hand_computed_inputs():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid 0.5, 0.75
    targets = torch.tensor([[1.0, 0.0]])
    ones = torch.ones(1, 2)
    # BCE: mean(-ln 0.5, -ln 0.25) = 1.5 ln 2; dice: 1 - (2*0.5 + 1) / (1.25 + 1 + 1)
    assert sigmoid_bce_loss(logits, targets, ones).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert dice_loss(logits, targets, ones).item() == pytest.approx(1 - 2 / 3.25, rel=1e-6)
    # a zero weight removes the second point: BCE ln 2; dice 1 - (1 + 1) / (0.5 + 1 + 1)
    half = torch.tensor([[1.0, 0.0]])
    assert sigmoid_bce_loss(logits, targets, half).item() == pytest.approx(math.log(2), rel=1e-6)
    assert dice_loss(logits, targets, half).item() == pytest.approx(0.2, rel=1e-6)


def test_pairwise_costs_equal_the_losses_of_each_pair():
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(2, 5, 64, generator=g)
    targets = torch.rand(2, 3, 64, generator=g).round()
    weights = torch.rand(2, 64, generator=g).round()
    bce, dice = pairwise_bce_cost(logits, targets, weights), pairwise_dice_cost(logits, targets, weights)
    for n in range(2):
        for q in range(5):
            for m in range(3):
                args = logits[n, q][None], targets[n, m][None], weights[n][None]
                assert bce[n, q, m].item() == pytest.approx(sigmoid_bce_loss(*args).item(), abs=1e-5)
                assert dice[n, q, m].item() == pytest.approx(dice_loss(*args).item(), abs=1e-6)


def test_importance_sampling_picks_uncertain_points():
    logits = torch.full((1, 1, 32, 32), 20.0)
    logits[..., 12:20] = 0.0  # an uncertain vertical band: a quarter of the image
    torch.manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=400, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (1, 400, 2)
    values = point_sample(logits, coords).flatten()
    uncertain, uniform = values[:300], values[300:]
    # 3 x 400 candidates hold ~300 band points; bilinear reads within half a pixel of the band are <= 10
    assert (uncertain <= 10.0).all()
    assert 0.1 < (uniform < 10.0).float().mean() < 0.5  # the rest stay uniform (~25-30 % near the band)


def test_semantic_targets_one_mask_per_present_class_ignoring_255():
    masks = torch.tensor([[[[0, 0], [2, 255]], [[255, 255], [255, 255]], [[1, 1], [1, 1]],
                           [[1, 255], [255, 255]]]])  # [1, 4, 2, 2]
    supervised = torch.tensor([[True, True, False, True]])
    # the reference's rule: 255 is 0 in every class mask; every supervised frame is kept (frame 1: no target)
    sem = semantic_targets(masks, supervised, num_classes=3)
    assert sem.rows.tolist() == [0, 1, 3]  # frame 2 unsupervised
    assert sem.labels.tolist() == [0, 2, 1] and sem.frame.tolist() == [0, 0, 2]
    assert sem.masks[:, 0].tolist() == [[[1, 1], [0, 0]], [[0, 0], [1, 0]], [[1, 0], [0, 0]]]
    assert sem.valid is None
    # ignore_padding: 255 marked as not counting, and a frame with no labelled pixel left out
    sem = semantic_targets(masks, supervised, num_classes=3, ignore_padding=True)
    assert sem.rows.tolist() == [0, 3]  # frame 1 is all ignore, frame 2 unsupervised
    assert sem.labels.tolist() == [0, 2, 1] and sem.frame.tolist() == [0, 0, 1]
    assert sem.masks[:, 0].tolist() == [[[1, 1], [0, 0]], [[0, 0], [1, 0]], [[1, 0], [0, 0]]]
    assert sem.valid[:, 0].tolist() == [[[1, 1], [1, 0]], [[1, 0], [0, 0]]]
    with pytest.raises(UsageError, match="class 7"):
        semantic_targets(torch.full((1, 1, 2, 2), 7), supervised[:, :1], num_classes=3)


def test_matcher_recovers_a_permutation_of_perfect_predictions():
    masks = block_targets(1, 2, size=32, num_classes=4, seed=3)
    sem = semantic_targets(masks, torch.ones(1, 2, dtype=torch.bool), num_classes=4)
    q, m = 7, sem.labels.shape[0]
    perm = torch.randperm(q, generator=torch.Generator().manual_seed(0))
    logits = torch.full((2, q, 5), -5.0)
    logits[:, :, -1] = 5.0  # unmatched queries say no-object
    pred = torch.full((2, q, 8, 8), -10.0)  # predictions at a quarter of the target size
    for j in range(m):
        frame, query = int(sem.frame[j]), int(perm[j])
        logits[frame, query, -1] = -5.0
        logits[frame, query, sem.labels[j]] = 5.0
        pred[frame, query] = torch.where(sem.masks[j, 0, ::4, ::4] > 0, 10.0, -10.0)
    torch.manual_seed(0)
    query, target = HungarianMatcher(2.0, 5.0, 5.0, num_points=512)(logits, pred, sem)
    assert sorted(target.tolist()) == list(range(m))
    assert all(int(perm[tg]) == qu for qu, tg in zip(query.tolist(), target.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# the terms of the criterion


def test_class_weights_and_cross_entropy_by_hand():
    criterion = SetCriterion(3, small_loss())
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
    assert build_criterion(get_preset("av2ts-tiny", "avss")).empty_weight.shape == (72,)

    masks = torch.zeros(1, 1, 16, 16, dtype=torch.int64)
    masks[0, 0, :8] = 2  # classes 0 and 2
    out = free_outputs(1, 4, 3, side=4, seed=5)
    # make queries 1 and 3 the obvious matches for classes 0 and 2
    with torch.no_grad():
        out["pred_logits"][0, 1, 0] = out["pred_logits"][0, 3, 2] = 8.0
        out["pred_masks"][0, 1] = torch.tensor([-9.0, -9, 9, 9]).view(4, 1)
        out["pred_masks"][0, 3] = torch.tensor([9.0, 9, -9, -9]).view(4, 1)
    loss = run(criterion, out, masks)["loss_ce"].item()
    logp = torch.log_softmax(out["pred_logits"][0].detach().double(), -1).numpy()
    target = [3, 0, 3, 2]  # unmatched queries -> no-object (index K = 3, weight 0.1)
    weight = [0.1, 1.0, 0.1, 1.0]
    expected = -sum(w * logp[i, c] for i, (c, w) in enumerate(zip(target, weight, strict=True))) / sum(weight)
    assert loss == pytest.approx(2.0 * expected, rel=1e-5)


def test_mask_loss_is_normalised_by_the_number_of_target_masks():
    # zero logits give BCE ln 2 at every point whatever the target: loss_mask = 5 * (M ln 2) / M
    criterion = SetCriterion(3, small_loss())
    masks = block_targets(2, 2, size=16, seed=1)
    out = free_outputs(4, 6, 3, side=4)
    with torch.no_grad():
        out["pred_masks"].zero_()
    assert run(criterion, out, masks)["loss_mask"].item() == pytest.approx(5 * math.log(2), rel=1e-5)


def cosine_by_hand(middle: np.ndarray, t: int) -> float:
    """Loops over clips and frame pairs, in float64."""
    clips = middle.reshape(-1, t, middle[0].size).astype(np.float64)
    total = 0.0
    for clip in clips:
        for i in range(t - 1):
            a, b = clip[i], clip[i + 1]
            loss = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            total += loss * math.exp(-loss)
    return total / clips.shape[0] / (t - 1)


@pytest.mark.parametrize("t", [3, 5])
def test_cosine_loss_against_a_hand_computation(t):
    g = torch.Generator().manual_seed(t)
    middle = torch.randn(2 * t, 4, 9, generator=g) + torch.linspace(0, 2, 2 * t).view(-1, 1, 1)
    middle.requires_grad_()
    value = inter_frame_cosine_loss(middle, t)
    assert value.item() == pytest.approx(cosine_by_hand(middle.detach().numpy(), t), rel=1e-5)

    # the exp(-l) weight is part of the graph: d(l e^-l) = (1 - l) e^-l dl
    value.backward()
    x = middle.detach().double().reshape(2, t, -1).requires_grad_()
    loss = 1 - torch.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1)
    (loss * torch.exp(-loss)).sum().div(2 * (t - 1)).backward()
    assert torch.allclose(middle.grad.double(), x.grad.reshape(middle.shape), atol=1e-6)
    x.grad = None
    loss = 1 - torch.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1)
    (loss * torch.exp(-loss).detach()).sum().div(2 * (t - 1)).backward()  # what a detached weight would give
    assert not torch.allclose(middle.grad.double(), x.grad.reshape(middle.shape), atol=1e-4)

    # in the criterion: weight 10, one key per middle mask, every frame counted even if unsupervised
    out = free_outputs(2 * t, 4, 2, side=3, middle=2)
    out["middle_masks"][1] = middle.detach()
    supervised = torch.zeros(2, t, dtype=torch.bool)
    supervised[:, 0] = True
    losses = run(SetCriterion(2, small_loss()), out, torch.zeros(2, t, 12, 12, dtype=torch.int64), supervised)
    assert losses["loss_cosine_1"].item() == pytest.approx(10 * cosine_by_hand(middle.detach().numpy(), t), rel=1e-5)
    assert inter_frame_cosine_loss(middle[:2], 1).item() == 0.0  # one frame per clip: no pairs


def test_ignore_pixels_do_not_count_with_ignore_padding():
    # uniform points only, so that the points drawn do not depend on the predictions being compared
    criterion = SetCriterion(3, small_loss(num_points=512, importance_sample_ratio=0.0), ignore_padding=True)
    masks = block_targets(1, 2, size=32, seed=2)
    ignored = masks.clone()
    ignored[:, :, :, :16] = 255  # the left half of both frames
    out = free_outputs(2, 5, 3, side=8, seed=3)
    flipped = {k: v.detach().clone() for k, v in out.items() if k.startswith("pred")}
    # opposite predictions in the ignored half (prediction columns 0-2 are read only by points left of 14 px)
    flipped["pred_masks"][..., :3] *= -1

    base = run(criterion, out, ignored)
    same = run(criterion, flipped, ignored)
    for key in SET_KEYS:
        assert same[key].item() == pytest.approx(base[key].item(), rel=1e-6)
    # with the labels back, the flip does change the loss (so the test above can fail)
    assert run(criterion, flipped, masks)["loss_mask"].item() != pytest.approx(run(criterion, out, masks)[
        "loss_mask"].item(), rel=1e-3)
    # and by default (the reference's rule) the ignored half counts as negatives: the flip changes the loss
    reference = SetCriterion(3, small_loss(num_points=512, importance_sample_ratio=0.0))
    assert run(reference, flipped, ignored)["loss_mask"].item() != pytest.approx(run(reference, out, ignored)[
        "loss_mask"].item(), rel=1e-3)


def test_unsupervised_frames_get_no_class_or_mask_gradient():
    criterion = SetCriterion(3, small_loss())
    masks = block_targets(2, 3, size=16, seed=4)
    supervised = torch.zeros(2, 3, dtype=torch.bool)
    supervised[:, 0] = True  # S4 training: frame 0 of each clip
    out = free_outputs(6, 5, 3, side=4, aux=1, middle=1)
    losses = run(criterion, out, masks, supervised)
    sum(v for k, v in losses.items() if not k.startswith("loss_cosine")).backward()
    rows = torch.arange(6)
    labelled = rows % 3 == 0
    for layer in (out, out["aux_outputs"][0]):
        for key in ("pred_logits", "pred_masks"):
            grad = layer[key].grad.flatten(1).abs().sum(1)
            assert (grad[labelled] > 0).all() and (grad[~labelled] == 0).all()

    # changing unlabelled frames' predictions and labels changes nothing
    other = free_outputs(6, 5, 3, side=4, aux=1, middle=1, seed=9)
    for layer, src in ((other, out), (other["aux_outputs"][0], out["aux_outputs"][0])):
        for key in ("pred_logits", "pred_masks"):
            layer[key] = torch.where(labelled.view(-1, *[1] * (src[key].dim() - 1)), src[key].detach(), layer[key])
    relabelled = masks.clone()
    relabelled[:, 1:] = 1
    again = run(criterion, other, relabelled, supervised)
    for key in (*SET_KEYS, "loss_ce_0", "loss_mask_0", "loss_dice_0"):
        assert again[key].item() == pytest.approx(losses[key].item(), rel=1e-6)


def test_all_ignore_frames_give_finite_losses_and_no_gradient_with_ignore_padding():
    criterion = SetCriterion(3, small_loss(), ignore_padding=True)
    masks = block_targets(1, 3, size=16, seed=5)
    masks[0, 1] = 255
    out = free_outputs(3, 5, 3, side=4, aux=1, middle=1)
    losses = run(criterion, out, masks)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert out["pred_masks"].grad[1].abs().sum() == 0 and out["pred_masks"].grad[0].abs().sum() > 0

    # nothing supervised anywhere: set losses are zero, still finite and differentiable
    empty = free_outputs(3, 5, 3, side=4, aux=1)
    losses = run(criterion, empty, torch.full((1, 3, 16, 16), 255))
    assert all(losses[k].item() == 0.0 for k in (*SET_KEYS, "loss_ce_0"))
    sum(losses.values()).backward()
    assert torch.isfinite(empty["pred_masks"].grad).all() and empty["pred_masks"].grad.abs().sum() == 0


def test_all_ignore_frames_learn_no_object_by_default():
    """The reference's rule: a supervised frame without a labelled pixel has no target, so every query of it learns
    no-object (class loss only); its masks get no gradient."""
    criterion = SetCriterion(3, small_loss())
    masks = block_targets(1, 3, size=16, seed=5)
    masks[0, 1] = 255
    out = free_outputs(3, 5, 3, side=4, aux=1, middle=1)
    losses = run(criterion, out, masks)
    sum(losses.values()).backward()
    assert out["pred_masks"].grad[1].abs().sum() == 0 and out["pred_masks"].grad[0].abs().sum() > 0
    assert out["pred_logits"].grad[1].abs().sum() > 0  # the class loss reaches the all-255 frame

    # nothing labelled anywhere: mask and dice zero; the class loss is the mean of -log p(no-object) (every weight
    # is the no-object weight, so it cancels), times the class weight 2
    empty = free_outputs(3, 5, 3, side=4, aux=1)
    losses = run(criterion, empty, torch.full((1, 3, 16, 16), 255))
    assert all(losses[k].item() == 0.0 for k in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"))
    for key, layer in (("loss_ce", empty), ("loss_ce_0", empty["aux_outputs"][0])):
        expected = -torch.log_softmax(layer["pred_logits"].detach().double(), -1)[..., -1].mean().item()
        assert losses[key].item() == pytest.approx(2.0 * expected, rel=1e-6)
    sum(losses.values()).backward()
    assert torch.isfinite(empty["pred_masks"].grad).all() and empty["pred_masks"].grad.abs().sum() == 0


def losses_by_hand(outputs: dict, masks: torch.Tensor, supervised: torch.Tensor, loss: LossConfig,
                   num_classes: int, ignore_padding: bool, seed: int = 0) -> dict[str, float]:
    """The criterion of the last layer written out one frame and one pair at a time, in float64.

    Default (the reference's rule, Mask2Former's matcher and losses): a class mask is 1 where the label is the
    class and 0 everywhere else, 255 included; the BCE cost in the reference's form (pos @ t + neg @ (1 - t)) / P;
    every point counts. ``ignore_padding``: each point weighs the bilinear share of labelled pixels around it.
    The points are drawn in the criterion's order from ``seed`` (matcher [N, P, 2]; then, for the mask losses,
    the importance candidates [M, P * ratio, 2] and the uniform points [M, P, 2]); importance_sample_ratio must be
    0 so that every mask-loss point is a uniform one."""
    assert loss.importance_sample_ratio == 0.0 and not loss.deep_supervision
    p_count = loss.num_points
    labels = masks.flatten(0, 1)
    logits_all = outputs["pred_logits"].detach().double()
    masks_all = outputs["pred_masks"].detach().double()
    rows = [r for r in range(labels.shape[0]) if supervised.flatten()[r]
            and (not ignore_padding or (labels[r] != 255).any())]

    def sample(image: torch.Tensor, coords: torch.Tensor, border: bool = False) -> torch.Tensor:  # [H, W], [P, 2]
        grid = (2 * coords.double() - 1).view(1, -1, 1, 2)
        return torch.nn.functional.grid_sample(image[None, None].double(), grid, align_corners=False,
                                               padding_mode="border" if border else "zeros").flatten()

    torch.manual_seed(seed)
    points = torch.rand(len(rows), p_count, 2)
    frames = []  # per frame: (row, classes, class masks, matched (query, target) pairs)
    for i, r in enumerate(rows):
        valid = (labels[r] != 255).double()
        classes = [int(c) for c in torch.unique(labels[r]) if c != 255]
        class_masks = [(labels[r] == c).double() for c in classes]
        w = sample(valid, points[i], border=True) if ignore_padding else torch.ones(p_count, dtype=torch.float64)
        probs = torch.softmax(logits_all[r], -1)
        cost = np.zeros((logits_all.shape[1], len(classes)))
        for q in range(logits_all.shape[1]):
            x = sample(masks_all[r, q], points[i])
            for m, c in enumerate(classes):
                t = sample(class_masks[m], points[i])
                pos = torch.nn.functional.softplus(-x)  # BCE against 1
                neg = torch.nn.functional.softplus(x)  # BCE against 0
                bce = (w * (pos * t + neg * (1 - t))).sum() / w.sum()
                s = torch.sigmoid(x)
                dice = 1 - (2 * (s * w * t).sum() + 1) / ((s * w).sum() + (t * w).sum() + 1)
                cost[q, m] = (-loss.class_weight * probs[q, c] + loss.mask_weight * bce
                              + loss.dice_weight * dice).item()
        qs, ms = linear_sum_assignment(cost)
        frames.append((r, classes, class_masks, list(zip(qs.tolist(), ms.tolist(), strict=True))))

    num_masks = max(sum(len(f[1]) for f in frames), 1)
    weight = torch.ones(num_classes + 1, dtype=torch.float64)
    weight[-1] = loss.no_object_weight
    ce_num = ce_den = 0.0
    for r, classes, _, pairs in frames:
        target = [num_classes] * logits_all.shape[1]
        for q, m in pairs:
            target[q] = classes[m]
        logp = torch.log_softmax(logits_all[r], -1)
        for q, c in enumerate(target):
            ce_num -= float(weight[c] * logp[q, c])
            ce_den += float(weight[c])
    matched = [(r, q, class_masks[m]) for r, _, class_masks, pairs in frames for q, m in pairs]
    torch.rand(len(matched), int(p_count * loss.oversample_ratio), 2)  # the importance candidates (not used)
    uniform = torch.rand(len(matched), p_count, 2)
    bce_sum = dice_sum = 0.0
    for j, (r, q, class_mask) in enumerate(matched):
        x, t = sample(masks_all[r, q], uniform[j]), sample(class_mask, uniform[j])
        valid = (labels[r] != 255).double()
        w = sample(valid, uniform[j], border=True) if ignore_padding else torch.ones(p_count, dtype=torch.float64)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
        bce_sum += float((w * bce).sum() / w.sum())
        s = torch.sigmoid(x) * w
        dice_sum += float(1 - (2 * (s * t).sum() + 1) / (s.sum() + (t * w).sum() + 1))
    return {"loss_ce": loss.class_weight * ce_num / ce_den, "loss_mask": loss.mask_weight * bce_sum / num_masks,
            "loss_dice": loss.dice_weight * dice_sum / num_masks}


def padded_clip(seed: int = 2) -> torch.Tensor:
    """int64 [1, 3, 32, 32]: block targets resized below the input and padded bottom/right with 255 (as after a
    random resize to 20 x 24 px), frame 2 unsupervised."""
    masks = block_targets(1, 3, size=32, seed=seed)
    masks[..., 20:, :] = 255
    masks[..., :, 24:] = 255
    return masks


def test_loss_on_a_padded_clip_counts_padding_as_negatives():
    """Against the hand computation: by default padded pixels are negatives of every class mask (the reference);
    with ignore_padding they weigh 0. The two rules give different losses on the same clip."""
    cfg = small_loss(num_points=256, importance_sample_ratio=0.0, deep_supervision=False)
    masks = padded_clip()
    supervised = torch.tensor([[True, True, False]])
    out = free_outputs(3, 6, 3, side=8, seed=11)
    results = {}
    for ignore in (False, True):
        got = run(SetCriterion(3, cfg, ignore_padding=ignore), out, masks, supervised, seed=4)
        expected = losses_by_hand(out, masks, supervised, cfg, 3, ignore, seed=4)
        for key in SET_KEYS:
            assert got[key].item() == pytest.approx(expected[key], rel=1e-5), (ignore, key)
        results[ignore] = expected
    assert results[False]["loss_dice"] != pytest.approx(results[True]["loss_dice"], rel=0.01)
    assert results[False]["loss_mask"] != pytest.approx(results[True]["loss_mask"], rel=0.01)
    # on the unpadded clip the two rules are one
    whole = block_targets(1, 3, size=32, seed=2)
    same = [run(SetCriterion(3, cfg, ignore_padding=ignore), out, whole, supervised, seed=4) for ignore in (0, 1)]
    assert all(same[0][k].item() == pytest.approx(same[1][k].item(), rel=1e-6) for k in SET_KEYS)


def test_criterion_under_bf16_autocast_keeps_matcher_costs_and_class_loss_in_fp32():
    """bf16 outputs under CPU autocast, as with --bf16: the matcher's costs and the class loss are fp32, and every
    loss equals the fp32 criterion's on the same (widened) values."""
    criterion = SetCriterion(3, small_loss())
    masks = block_targets(2, 2, size=16, seed=6)
    supervised = torch.ones(2, 2, dtype=torch.bool)
    out = free_outputs(4, 6, 3, side=4, aux=1, middle=1, seed=2)

    def low(x: torch.Tensor) -> torch.Tensor:
        return x.detach().bfloat16().requires_grad_()

    low_out = {"pred_logits": low(out["pred_logits"]), "pred_masks": low(out["pred_masks"]),
               "aux_outputs": [{k: low(v) for k, v in out["aux_outputs"][0].items()}],
               "middle_masks": [low(out["middle_masks"][0])]}
    wide_out = {"pred_logits": low_out["pred_logits"].detach().float(),
                "pred_masks": low_out["pred_masks"].detach().float(),
                "aux_outputs": [{k: v.detach().float() for k, v in low_out["aux_outputs"][0].items()}],
                "middle_masks": [low_out["middle_masks"][0].detach().float()]}
    sem = semantic_targets(masks, supervised, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (low_out["pred_logits"] @ low_out["pred_logits"].transpose(1, 2)).dtype == torch.bfloat16  # active
        torch.manual_seed(0)
        costs = criterion.matcher.costs(low_out["pred_logits"], low_out["pred_masks"], sem)
        losses = run(criterion, low_out, masks, supervised)
    torch.manual_seed(0)
    wide_costs = criterion.matcher.costs(wide_out["pred_logits"], wide_out["pred_masks"], sem)
    assert costs.dtype == torch.float32 and torch.equal(costs, wide_costs)
    wide = run(criterion, wide_out, masks, supervised)
    assert all(v.dtype == torch.float32 for v in losses.values())
    for key in losses:
        assert losses[key].item() == pytest.approx(wide[key].item(), rel=1e-6), key
    sum(losses.values()).backward()
    assert low_out["pred_masks"].grad.dtype == torch.bfloat16 and low_out["pred_masks"].grad.abs().sum() > 0


def test_gradients_reach_every_output_and_keys_follow_deep_supervision():
    criterion = SetCriterion(3, small_loss())
    masks = block_targets(2, 2, size=16, seed=6)
    out = free_outputs(4, 6, 3, side=4, aux=3, middle=2)
    losses = run(criterion, out, masks)
    expected = {*SET_KEYS, *(f"{k}_{i}" for k in SET_KEYS for i in range(3)), "loss_cosine_0", "loss_cosine_1"}
    assert set(losses) == expected
    sum(losses.values()).backward()
    tensors = [out["pred_logits"], out["pred_masks"], *out["middle_masks"]]
    tensors += [a[k] for a in out["aux_outputs"] for k in ("pred_logits", "pred_masks")]
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors)

    no_aux = SetCriterion(3, small_loss(deep_supervision=False))
    assert set(run(no_aux, out, masks)) == {*SET_KEYS, "loss_cosine_0", "loss_cosine_1"}


def test_criterion_matches_when_the_process_group_is_initialised(tmp_path):
    import torch.distributed as dist

    criterion = SetCriterion(3, small_loss())
    masks = block_targets(1, 2, size=16, seed=7)
    out = free_outputs(2, 5, 3, side=4)
    alone = run(criterion, out, masks)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped = run(criterion, out, masks)
    finally:
        dist.destroy_process_group()
    assert all(grouped[k].item() == pytest.approx(alone[k].item(), rel=1e-6) for k in alone)


def test_bad_targets_and_outputs_are_usage_errors():
    criterion = SetCriterion(3, small_loss())
    masks = block_targets(1, 2, size=16)
    out = free_outputs(2, 5, 3, side=4)
    with pytest.raises(UsageError, match="supervised"):
        criterion(out, {"masks": masks, "supervised": torch.ones(1, 3, dtype=torch.bool)})
    with pytest.raises(UsageError, match="pred_logits"):
        criterion(free_outputs(2, 5, 4, side=4), {"masks": masks, "supervised": torch.ones(1, 2, dtype=torch.bool)})
    with pytest.raises(UsageError, match="int64"):
        criterion(out, {"masks": masks.float(), "supervised": torch.ones(1, 2, dtype=torch.bool)})
    with pytest.raises(UsageError, match="importance_sample_ratio"):
        SetCriterion(3, small_loss(importance_sample_ratio=1.5))


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds synchronisation (several times slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_adam_on_free_tensors_drives_the_loss_down(one_thread):
    # Predictions at a quarter of the target size, as from the model. The loss cannot reach 0: bilinear targets are
    # fractional within half a pixel of each edge and importance sampling seeks those points out, so the frames are
    # large (128 px) and hold one block each to keep that floor well under 10 % of the start.
    criterion = SetCriterion(3, small_loss())
    masks = torch.zeros(2, 2, 128, 128, dtype=torch.int64)
    for i, (y, x) in enumerate([(8, 20), (16, 24), (40, 4), (44, 12)]):
        masks.view(4, 128, 128)[i, y:y + 64, x:x + 60] = 1 + i // 2
    out = free_outputs(4, 8, 3, side=32, aux=1)
    clip_base = torch.randn(2, 1, 8, 32 * 32, generator=torch.Generator().manual_seed(1))
    out["middle_masks"] = [(clip_base + 0.5 * torch.randn(2, 2, 8, 32 * 32)).reshape(4, 8, -1).requires_grad_()]
    params = [out["pred_logits"], out["pred_masks"], *out["middle_masks"]]
    params += [out["aux_outputs"][0][k] for k in ("pred_logits", "pred_masks")]
    optimiser = torch.optim.Adam(params, lr=0.3)
    torch.manual_seed(0)
    history = []
    for _ in range(80):
        total = sum(criterion(out, {"masks": masks, "supervised": torch.ones(2, 2, dtype=torch.bool)}).values())
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append(total.item())
    assert min(history[-5:]) < 0.1 * history[0], (history[0], history[-5:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_criterion_on_cuda_under_autocast():
    # bf16 outputs as under AMP: the criterion computes in fp32 and matches on the CPU
    criterion = SetCriterion(3, small_loss()).cuda()
    masks = block_targets(2, 2, size=16, seed=6).cuda()
    out = free_outputs(4, 6, 3, side=4, aux=1, middle=1)
    with torch.no_grad():
        out["pred_masks"].zero_()
    def to_cuda(x):
        return x.detach().cuda().bfloat16().requires_grad_()

    cuda_out = {"pred_logits": to_cuda(out["pred_logits"]), "pred_masks": to_cuda(out["pred_masks"]),
                "aux_outputs": [{k: to_cuda(v) for k, v in out["aux_outputs"][0].items()}],
                "middle_masks": [to_cuda(out["middle_masks"][0])]}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = run(criterion, cuda_out, masks)
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in losses.values())
    assert losses["loss_mask"].item() == pytest.approx(5 * math.log(2), rel=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(cuda_out["pred_logits"].grad.float()).all() and cuda_out["pred_logits"].grad.abs().sum() > 0
