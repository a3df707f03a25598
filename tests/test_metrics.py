"""The official metrics (av2ts_cli/metrics.py) on hand-computed cases of every rule of docs/data-and-metrics.md,
'Metrics'"""

from __future__ import annotations

import math

import pytest
import torch

from av2ts_cli.metrics import (
    AVSS_EPS,
    PROTOCOLS,
    BinaryMetrics,
    SemanticMetrics,
    class_areas,
    frame_iou,
    fscore_curves,
    fscore_thresholds,
    upsample_labels,
)


def f_beta(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 1.3 * precision * recall / (0.3 * precision + recall)


def frames(*rows):
    """Frames of 1 x W pixels: frames([0.9, 0.3], [0.2, 0.1]) -> [2, 1, 2] float32."""
    return torch.tensor([[row] for row in rows], dtype=torch.float32)


# Two 1x4 frames whose F curves are known in closed form (GT = the first two pixels).
GT = [1, 1, 0, 0]
FRAME_A = [0.9, 0.3, 0.6, 0.0]  # max F = f(1, 1/2) = 0.8125 for t in (0.6, 0.9]
FRAME_B = [0.2, 0.2, 0.0, 0.0]  # F = 1 for t in (0, 0.2]


def curve_a(t: float) -> float:
    predicted = [p >= t for p in FRAME_A]
    tp = sum(1 for p, g in zip(predicted, GT, strict=True) if p and g)
    return f_beta(tp / sum(predicted), tp / 2) if sum(predicted) else 0.0


# ------------------------------------------------------------------------------------------------ thresholds
def test_threshold_list_is_the_official_float32_linspace():
    t = fscore_thresholds()
    assert t.dtype == torch.float32 and t.shape == (255,)
    assert t[0] == 0 and t[-1] == 1.0  # 1 - 1e-10 rounds to exactly 1 in float32
    assert t[1].item() == pytest.approx(1 / 254, rel=1e-6)


def test_fscore_curve_matches_the_per_threshold_definition():
    curves, counted = fscore_curves(frames(FRAME_A), frames(GT))
    expected = [curve_a(float(t)) for t in fscore_thresholds()]
    assert counted.tolist() == [True]
    assert curves[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert curves[0].max().item() == pytest.approx(0.8125, abs=1e-6)
    assert curves[0, 0].item() == pytest.approx(f_beta(0.5, 1.0), abs=1e-6)  # t = 0: every pixel predicted
    assert curves[0, -1].item() == 0  # t = 1: nothing predicted: 0/0 -> NaN -> 0


def test_threshold_is_greater_or_equal_for_f_and_strictly_greater_for_iou():
    prob = frames([1.0, 0.5])
    gt = frames([1, 1])
    curves, _ = fscore_curves(prob, gt)
    assert curves[0, -1].item() == pytest.approx(f_beta(1.0, 0.5), abs=1e-6)  # p = 1.0 >= t = 1.0 counts
    assert frame_iou(prob, gt).item() == pytest.approx(0.5, abs=1e-6)  # p = 0.5 is not > 0.5


# ---------------------------------------------------------------------------------------------------- J (mIoU)
def test_iou_normal_frame():
    prob = frames([0.9, 0.8, 0.7, 0.1])
    gt = frames([1, 1, 0, 0])
    assert frame_iou(prob, gt).item() == pytest.approx(2 / (3 + 1e-7), rel=1e-12)


def test_iou_empty_gt_frame_scores_its_true_negatives():
    prob = frames([0.9, 0.1, 0.2, 0.3])
    gt = frames([0, 0, 0, 0])
    assert frame_iou(prob, gt).item() == pytest.approx(3 / (4 + 1e-7), rel=1e-12)
    assert frame_iou(frames([0.0, 0.0]), frames([0, 0])).item() == pytest.approx(1.0, abs=1e-7)


def test_miou_is_the_mean_over_frames():
    metric = BinaryMetrics()
    metric.update(frames([0.9, 0.9], [0.9, 0.1]), frames([1, 1], [1, 1]))  # IoU 1 and 1/2
    metric.update(frames([0.1, 0.1]), frames([0, 1]))  # IoU 0
    assert metric.result()["miou"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-6)
    assert metric.result()["frames"] == 3 and metric.result()["videos"] == 2


# ------------------------------------------------------------------------------------------------------- F
def test_empty_gt_frames_are_skipped_in_f():
    metric = BinaryMetrics()
    metric.update(frames(FRAME_A, [0.9, 0.9, 0.9, 0.9]), frames(GT, [0, 0, 0, 0]))
    assert metric.result()["fscore"] == pytest.approx(0.8125, abs=1e-6)  # the empty frame does not count


def test_a_group_without_counted_frames_scores_zero_and_is_averaged_in():
    metric = BinaryMetrics()
    metric.update(frames(FRAME_B), frames(GT))  # F = 1
    metric.update(frames([0.0, 0.0, 0.0, 0.0]), frames([0, 0, 0, 0]))  # only empty GT: 0
    assert metric.result("av2ts")["fscore"] == pytest.approx(0.5, abs=1e-6)


def test_f_groups_one_video_or_four_in_order():
    """av2ts: mean of per-video maxima; avsbench: the curve averaged over 4 consecutive videos, then the max."""
    metric = BinaryMetrics()
    for frame in (FRAME_A, FRAME_B, FRAME_A, FRAME_B, FRAME_B):
        metric.update(frames(frame), frames(GT))
    # A + B averaged: for t in (0, 0.2], (f(2/3, 1) + 1) / 2 is the best point of the mean curve
    group = (f_beta(2 / 3, 1.0) + 1.0) / 2
    assert group == pytest.approx(0.861111, abs=1e-6)
    assert metric.result("av2ts")["fscore"] == pytest.approx((2 * 0.8125 + 3 * 1.0) / 5, abs=1e-6)
    avsbench = metric.result("avsbench")
    assert avsbench["fscore"] == pytest.approx((group + 1.0) / 2, abs=1e-6)  # groups [A B A B] and [B]
    assert avsbench["fscore_group_size"] == 4
    assert avsbench["miou"] == metric.result("av2ts")["miou"]  # grouping never changes J


def test_curves_are_averaged_over_counted_frames_within_a_video():
    metric = BinaryMetrics()
    metric.update(frames(FRAME_A, FRAME_B), frames(GT, GT))  # one video: the mean curve's max, not the maxima's mean
    assert metric.result()["fscore"] == pytest.approx((f_beta(2 / 3, 1.0) + 1.0) / 2, abs=1e-6)


def test_vectorised_curves_agree_with_a_per_threshold_loop_on_random_maps():
    torch.manual_seed(0)
    prob = torch.rand(3, 16, 16)
    prob[0] = torch.round(prob[0] * 8) / 8  # ties with the threshold grid
    gt = (torch.rand(3, 16, 16) > 0.6).float()
    curves, _ = fscore_curves(prob, gt)
    for n in range(3):
        for j, t in enumerate(fscore_thresholds()):
            predicted = (prob[n] >= t).float()
            tp = (predicted * gt[n]).sum()
            precision, recall = tp / (predicted.sum() + 1e-20), tp / (gt[n].sum() + 1e-20)
            f = (1.3 * precision * recall / (0.3 * precision + recall)).nan_to_num(0.0)
            assert curves[n, j].item() == pytest.approx(f.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- AVSS
def labels(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_avss_per_class_counting_and_nan_handling():
    metric = SemanticMetrics(num_classes=4)
    # frame 1: class 0 exact, class 1 under-predicted, class 2 predicted but absent; frame 2: all class 3
    metric.update(labels([[0, 1], [2, 2]], [[3, 3], [3, 3]]), labels([[0, 1], [1, 1]], [[3, 3], [3, 3]]))
    result = metric.result()
    f1 = f_beta(1.0, 1 / 3)
    assert result["per_class"]["frames"] == [1, 1, 1, 1]  # class 3 counted once: absent (union 0) in frame 1
    assert result["per_class"]["iou"] == pytest.approx([1.0, 1 / 3, 0.0, 1.0], abs=1e-9)
    assert result["per_class"]["fscore"] == pytest.approx([1.0, f1, 0.0, 1.0], abs=1e-9)  # NaN recall -> 0
    assert result["miou"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4, abs=1e-9)
    assert result["fscore"] == pytest.approx((1 + f1 + 0 + 1) / 4, abs=1e-9)


def test_avss_classes_never_seen_count_as_zero_in_the_mean():
    metric = SemanticMetrics(num_classes=71)
    metric.update(labels([[0, 5]]), labels([[0, 5]]))
    assert metric.result()["miou"] == pytest.approx(2 / 71, abs=1e-9)
    assert metric.result()["fscore"] == pytest.approx(2 / 71, abs=1e-9)


def test_avss_iou_and_f_are_averaged_per_frame_not_pooled():
    metric = SemanticMetrics(num_classes=2)
    metric.update(labels([[1, 1, 1, 1]], [[1, 0, 0, 0]]), labels([[1, 1, 1, 1]], [[1, 1, 0, 0]]))
    # class 1: frame IoUs 1 and 1/2 -> 0.75 (pooled over pixels it would be 5/6); class 0: frame 2 only, 2/3
    assert metric.result()["per_class"]["iou"] == pytest.approx([2 / 3, 0.75], abs=1e-9)


def test_avss_ignore_pixels_are_left_out():
    inter, predicted, truth = class_areas(labels([[1, 2, 0]]), labels([[1, 255, 0]]), 3)
    assert inter.tolist() == [[1, 1, 0]] and predicted.tolist() == [[1, 1, 0]] and truth.tolist() == [[1, 1, 0]]


def test_avss_padding_frames_add_background_only():
    metric = SemanticMetrics(num_classes=3)
    metric.update(labels([[0, 1, 1, 1]]), labels([[0, 0, 1, 1]]))  # background IoU 1/2, class 1 IoU 2/3
    before = metric.result()
    metric.add_padding(frames=5, pixels=4)
    after = metric.result()
    background = (0.5 + 5 * 4 / (4 + AVSS_EPS)) / 6
    assert after["per_class"]["iou"][0] == pytest.approx(background, abs=1e-12)
    assert after["per_class"]["iou"][1:] == before["per_class"]["iou"][1:]
    assert after["per_class"]["fscore"][0] == pytest.approx((f_beta(1.0, 0.5) + 5) / 6, abs=1e-12)
    assert after["padded_frames"] == 5 and after["frames"] == 1
    assert after["miou"] == pytest.approx((background + 2 / 3 + 0) / 3, abs=1e-12)


def test_empty_metrics_are_nan_not_an_error():
    assert math.isnan(BinaryMetrics().result()["miou"])


# ------------------------------------------------------------------------------------- the avsegformer protocol
def test_labels_are_upsampled_with_pils_nearest_rule():
    """Output pixel j takes input pixel floor((j + 0.5) * H / size): 3 -> 4 repeats the middle row and column
    (0, 1, 1, 2), where floor(j * H / size) would repeat the first (0, 0, 1, 2)."""
    labels = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9]]], dtype=torch.uint8)
    assert upsample_labels(labels, 4).tolist() == [[[1, 2, 2, 3], [4, 5, 5, 6], [4, 5, 5, 6], [7, 8, 8, 9]]]
    assert upsample_labels(labels, 4).dtype == torch.uint8
    two = torch.tensor([[[True, False], [False, False]]])
    assert upsample_labels(two, 4)[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert upsample_labels(two, 2) is two  # already at the size: untouched


def test_the_avsegformer_protocol_on_a_hand_checked_case():
    """Three one-frame videos in CSV order, 2 x 2 labels scored at 4 x 4 (the protocol's 512 x 512 in miniature),
    F grouped per 2 videos. By hand (F(P, R) = 1.3 P R / (0.3 P + R)):

    A: label [[1, 0], [0, 0]] -> the top-left 2 x 2 block (4 of 16 pixels); p = 0.9 on it, 0.6 on two more pixels.
       J: p > 0.5 marks 6 pixels, 4 of them right: 4/6. F curve: t <= 0.6: P = 4/6, R = 1, F = 0.8667/1.2 = 0.72222;
       0.6 < t <= 0.9: P = R = 1, F = 1; t > 0.9: 0.
    B: label [[0, 1], [1, 1]] -> 12 of 16 pixels; p = 0.7 everywhere. J: 12/16 = 0.75. F: t <= 0.7: P = 0.75, R = 1,
       F = 0.975/1.225 = 0.795918; t > 0.7: 0.
    C: an empty label, p = 0 everywhere. J: the true negatives over all pixels, 16/16 = 1. F: not counted.

    J = (2/3 + 0.75 + 1) / 3 = 0.805556 under every protocol.
    F, avsegformer, groups [A, B] and [C]: the mean of A's and B's curves peaks at 0.6 < t <= 0.7 with
    (1 + 0.795918) / 2 = 0.897959; [C] has no counted frame and scores 0: F = 0.897959 / 2 = 0.448980.
    F, av2ts (per video): (1 + 0.795918 + 0) / 3 = 0.598639. F, avsbench ([A, B, C] one group): 0.897959.
    """
    protocol = PROTOCOLS["avsegformer"]
    assert (protocol.fscore_group_size, protocol.binary_size, protocol.avss_padding) == (2, 512, True)
    label_a = torch.tensor([[[1, 0], [0, 0]]])
    prob_a = torch.zeros(1, 4, 4)
    prob_a[0, :2, :2] = 0.9
    prob_a[0, 3, 2:] = 0.6
    label_b = torch.tensor([[[0, 1], [1, 1]]])
    prob_b = torch.full((1, 4, 4), 0.7)
    label_c = torch.zeros(1, 2, 2, dtype=torch.int64)
    prob_c = torch.zeros(1, 4, 4)
    metric = BinaryMetrics()
    for prob, label in ((prob_a, label_a), (prob_b, label_b), (prob_c, label_c)):
        metric.update(prob, upsample_labels(label, 4) == 1)
    result = metric.result("avsegformer")
    assert result["miou"] == pytest.approx((2 / 3 + 0.75 + 1) / 3, abs=1e-6)
    assert result["miou"] == pytest.approx(0.805556, abs=1e-6)
    assert result["fscore"] == pytest.approx(0.448980, abs=1e-6) and result["fscore_group_size"] == 2
    assert metric.result("av2ts")["fscore"] == pytest.approx(0.598639, abs=1e-6)
    assert metric.result("avsbench")["fscore"] == pytest.approx(0.897959, abs=1e-6)


# ---------------------------------------------------------------------------------------- what the picture shows
def test_the_pictures_figures_ride_along_without_changing_the_scores():
    """``video_miou``, ``fscore_curve`` and ``present`` are for metrics.png (plots.draw_metrics): each video's
    mean J, the mean of the groups' F(t) curves (whose max is at most the F-score: each group takes its own
    best threshold), and the frames whose ground truth holds each class."""
    metric = BinaryMetrics()
    metric.update(frames(FRAME_A), frames(GT).bool())  # one video per frame: the two groups' curves differ
    metric.update(frames(FRAME_B), frames(GT).bool())
    result = metric.result()
    assert result["video_miou"] == pytest.approx([1 / 3, 0.0], abs=1e-6)  # A: p > 0.5 on pixels 0 and 2 (J eps)
    assert result["miou"] == pytest.approx(sum(result["video_miou"]) / 2, abs=1e-12)  # equal frames per video
    curve = torch.tensor(result["fscore_curve"], dtype=torch.float64)
    thresholds = fscore_thresholds().tolist()
    assert len(curve) == 255 and result["fscore"] == pytest.approx((0.8125 + 1.0) / 2, abs=1e-6)
    expected = [(curve_a(t) + (1.0 if 0 < t <= 0.2 else 0.0 if t > 0 else f_beta(0.5, 1.0))) / 2 for t in thresholds]
    assert curve.tolist() == pytest.approx(expected, abs=1e-6)
    assert float(curve.max()) <= result["fscore"] + 1e-9

    semantic = SemanticMetrics(num_classes=4)
    semantic.update(labels([[0, 1], [2, 2]]), labels([[0, 1], [1, 1]]))  # class 2 predicted, never labelled
    semantic.add_padding(frames=2, pixels=4)
    other = SemanticMetrics(num_classes=4)
    other.update(labels([[3, 3]]), labels([[3, 0]]))
    semantic.merge(other)
    per_class = semantic.result()["per_class"]
    assert per_class["present"] == [4, 1, 0, 1] and per_class["frames"] == [4, 1, 1, 1]
