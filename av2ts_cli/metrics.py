"""The official AVSBench metrics (docs/data-and-metrics.md, 'Metrics'), vectorised.

S4/MS3 (``BinaryMetrics``), per frame, from the foreground probability p and the binary ground truth G:

- J ("mIoU"): pred = p > 0.5 (strictly); IoU = |pred & G| / (|pred | G| + 1e-7); a frame whose G is empty scores its
  true negatives over all pixels instead. The dataset value is the mean over frames (what the official mean of
  batch means equals on the official splits).
- F: the curve F(t) = 1.3 P R / (0.3 P + R) over the 255 thresholds ``torch.linspace(0, 1 - 1e-10, 255)`` (float32,
  so the last is exactly 1.0), pred = p >= t, P = TP / (|pred| + 1e-20), R = TP / (|G| + 1e-20), NaN -> 0; frames
  with an empty G are skipped. Curves are averaged over the counted frames of a group, the group scores the max over
  thresholds (0 when it has no counted frame), and the dataset value is the mean over groups. A group is one video
  in the ``av2ts`` protocol (COMBO/AV2TS evaluate one video per batch), 4 consecutive videos in CSV order in the
  ``avsbench`` protocol (the official test batch size) and 2 in the ``avsegformer`` protocol (its test batch).

AVSS (``SemanticMetrics``), per frame and class c: inter, pred and GT areas; IoU = inter / (union + 2.22e-16);
F = 1.3 P R / (0.3 P + R) with P = inter / pred, R = inter / GT, NaN -> 0; the class counter n_c grows only when
union > 0. Sums run over every frame of the split; the result is the mean over all classes, background included,
of sum / n_c, with 0 for a class never seen (n_c = 0) still counted in the mean. Pixels labelled 255 are left out.
The ``avsbench`` protocol pads 5-frame (v1) clips to 10 frames with black frames, which the model is taken to
predict as background against an all-background label (``add_padding``).

``PROTOCOLS`` holds the one definition of each named protocol (``Protocol``); ``av2ts eval --protocol`` picks one:

- ``av2ts`` (the default, for comparisons across families): F per video; AVSS on its real frames;
- ``avsbench``: F per 4 videos; AVSS with the padded frames;
- ``avsegformer``: what AVSegFormer's test scripts compute (vvvb-github/AVSegFormer at 7083cb6): S4/MS3 at
  512 x 512, the labels upsampled from their 224 x 224 with PIL's nearest rule (``upsample_labels``) and the
  prediction resized to 512 (an AVSegFormer model's map is 512 already), F per 2 videos (its test batch); AVSS
  with the padded frames, at 224 x 224 as every protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from av2ts_cli.avsbench import IGNORE_INDEX


@dataclass(frozen=True)
class Protocol:
    """How a split is scored, where published numbers differ (docs/data-and-metrics.md, 'Protocols')."""

    name: str
    fscore_group_size: int  # S4/MS3: videos per F-score group (consecutive in CSV order)
    avss_padding: bool  # AVSS: count the black frames that pad 5-frame (v1) clips to 10
    binary_size: int | None = None  # S4/MS3: scored at this square size, labels upsampled to it; None: theirs


PROTOCOLS: dict[str, Protocol] = {
    "av2ts": Protocol("av2ts", fscore_group_size=1, avss_padding=False),
    "avsbench": Protocol("avsbench", fscore_group_size=4, avss_padding=True),
    "avsegformer": Protocol("avsegformer", fscore_group_size=2, avss_padding=True, binary_size=512),
}
NUM_THRESHOLDS = 255
BETA2 = 0.3
IOU_EPS = 1e-7
F_EPS = 1e-20
AVSS_EPS = 2.220446049250313e-16
AVSS_PADDED_LENGTH = 10  # official AVSS clips: v1 clips are padded to 10 frames


def fscore_thresholds() -> torch.Tensor:
    """The 255 official F-score thresholds (float32; the last one rounds to 1.0)."""
    return torch.linspace(0, 1 - 1e-10, NUM_THRESHOLDS)


def upsample_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W] labels (0/1 or class indices) -> [N, size, size], nearest with PIL's rule (output pixel i takes
    input pixel floor((i + 0.5) * H / size), torch's "nearest-exact"): what ``Resize`` does to AVSegFormer's mask
    images (PIL forces nearest for mode '1' and 'P'). The same dtype."""
    if tuple(labels.shape[-2:]) == (size, size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
    return resized.to(labels.dtype)


# --------------------------------------------------------------------------------------------------- S4 / MS3
def frame_iou(prob: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """prob: [N, H, W] foreground probability; gt: [N, H, W] {0, 1} -> [N] float64 per-frame J (empty-GT rule)."""
    pred = prob > 0.5
    truth = gt.bool()
    inter = (pred & truth).flatten(1).sum(1)
    union = (pred | truth).flatten(1).sum(1)
    empty = truth.flatten(1).sum(1) == 0
    true_negatives = (~pred & ~truth).flatten(1).sum(1)
    inter = torch.where(empty, true_negatives, inter).double()
    union = torch.where(empty, torch.full_like(union, pred[0].numel()), union).double()
    return inter / (union + IOU_EPS)


def fscore_curves(prob: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prob: [N, H, W]; gt: [N, H, W] {0, 1} -> (curves [N, 255] float32 F(t) per frame, counted [N] bool: frames
    with a non-empty GT). Counts for all thresholds come from one histogram of the threshold bucket of each pixel."""
    n = prob.shape[0]
    p = prob.reshape(n, -1).float().contiguous()
    truth = gt.reshape(n, -1).bool()
    bucket = torch.bucketize(p, fscore_thresholds().to(p.device), right=True)  # = #thresholds <= p, in 0..255
    offsets = (torch.arange(n, device=p.device) * (NUM_THRESHOLDS + 1))[:, None]
    size = n * (NUM_THRESHOLDS + 1)
    hist_all = torch.bincount((bucket + offsets).flatten(), minlength=size).view(n, -1)
    hist_true = torch.bincount((bucket + offsets)[truth], minlength=size).view(n, -1)
    # pixels with p >= threshold j are those in buckets j+1..255: a suffix sum
    predicted = hist_all.flip(1).cumsum(1).flip(1)[:, 1:].float()
    true_positive = hist_true.flip(1).cumsum(1).flip(1)[:, 1:].float()
    positives = truth.sum(1, keepdim=True).float()
    precision = true_positive / (predicted + F_EPS)
    recall = true_positive / (positives + F_EPS)
    curves = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
    curves = torch.nan_to_num(curves, nan=0.0)
    return curves, positives[:, 0] > 0


class BinaryMetrics:
    """S4/MS3 J and F, accumulated video by video (keep the CSV order: ``avsbench`` groups 4 consecutive videos)."""

    def __init__(self):
        self.ious: list[torch.Tensor] = []  # per video: [T] float64
        self.curve_sums: list[torch.Tensor] = []  # per video: [255] float64 sum of counted frames' curves
        self.curve_counts: list[int] = []

    def update(self, prob: torch.Tensor, gt: torch.Tensor) -> None:
        """One video's annotated frames: prob [T, H, W] foreground probability, gt [T, H, W] {0, 1}."""
        if prob.shape != gt.shape:
            raise ValueError(f"prediction {list(prob.shape)} and ground truth {list(gt.shape)} differ in shape")
        self.ious.append(frame_iou(prob, gt).cpu())
        curves, counted = fscore_curves(prob, gt)
        self.curve_sums.append(curves[counted].double().sum(0).cpu())
        self.curve_counts.append(int(counted.sum()))

    def merge(self, other: BinaryMetrics) -> None:
        """Append ``other``'s videos after this one's (merge in CSV order: groups follow it)."""
        self.ious += other.ious
        self.curve_sums += other.curve_sums
        self.curve_counts += other.curve_counts

    @property
    def frames(self) -> int:
        return sum(len(i) for i in self.ious)

    def result(self, protocol: str = "av2ts") -> dict:
        """{"miou", "fscore", "videos", "frames", "fscore_group_size", "video_miou", "fscore_curve"}. The last two
        are for the picture (``plots.draw_metrics``), not scores: each video's mean J over its frames, and the
        mean of the groups' F(t) curves [255] (the F-score takes each group's own max, so it can exceed this
        curve's max)."""
        group = PROTOCOLS[protocol].fscore_group_size
        if not self.ious:
            return {"miou": float("nan"), "fscore": float("nan"), "videos": 0, "frames": 0,
                    "fscore_group_size": group, "video_miou": [], "fscore_curve": []}
        miou = float(torch.cat(self.ious).mean())
        scores = []
        curves = torch.zeros(NUM_THRESHOLDS, dtype=torch.float64)
        for start in range(0, len(self.curve_sums), group):
            count = sum(self.curve_counts[start:start + group])
            if count == 0:
                scores.append(0.0)  # the official code keeps an all-zero curve for a group with no counted frame
                continue
            curve = torch.stack(self.curve_sums[start:start + group]).sum(0) / count
            scores.append(float(curve.max()))
            curves += curve
        return {"miou": miou, "fscore": sum(scores) / len(scores), "videos": len(self.ious), "frames": self.frames,
                "fscore_group_size": group, "video_miou": [float(i.mean()) for i in self.ious],
                "fscore_curve": (curves / len(scores)).tolist()}


# -------------------------------------------------------------------------------------------------------- AVSS
def class_areas(pred: torch.Tensor, gt: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred, gt: [N, H, W] class indices (gt 255 = ignored pixel; pred outside 0..K-1 counts for no class) ->
    (intersection, predicted, ground-truth) pixel counts, each [N, K] int64."""
    n = pred.shape[0]
    pred = pred.reshape(n, -1).long()
    gt = gt.reshape(n, -1).long()
    valid = gt != IGNORE_INDEX
    offsets = (torch.arange(n, device=pred.device) * num_classes)[:, None]
    size = n * num_classes

    def histogram(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep & (labels >= 0) & (labels < num_classes)
        return torch.bincount((labels + offsets)[keep], minlength=size).view(n, num_classes)

    return histogram(pred, valid & (pred == gt)), histogram(pred, valid), histogram(gt, valid)


class SemanticMetrics:
    """AVSS per-class IoU and F accumulated over every frame of a split."""

    def __init__(self, num_classes: int = 71):
        self.num_classes = num_classes
        self.iou_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.f_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self.present = torch.zeros(num_classes, dtype=torch.int64)  # frames whose ground truth holds the class
        self.frames = 0
        self.padded_frames = 0
        self.videos = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """One video's annotated frames: pred, gt [T, H, W] class indices."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {list(pred.shape)} and ground truth {list(gt.shape)} differ in shape")
        inter, predicted, truth = (a.double().cpu() for a in class_areas(pred, gt, self.num_classes))
        union = predicted + truth - inter
        self.iou_sum += (inter / (union + AVSS_EPS)).sum(0)
        precision, recall = inter / predicted, inter / truth  # 0/0 -> NaN, zeroed below
        f = torch.nan_to_num((1 + BETA2) * precision * recall / (BETA2 * precision + recall), nan=0.0)
        self.f_sum += f.sum(0)
        self.counts += (union > 0).sum(0)
        self.present += (truth > 0).sum(0)
        self.frames += pred.shape[0]
        self.videos += 1

    def add_padding(self, frames: int, pixels: int) -> None:
        """``frames`` black padding frames of ``pixels`` pixels, predicted background against background labels:
        background gets IoU = pixels / (pixels + eps), F = 1 and a count each; no other class is touched."""
        if frames <= 0:
            return
        self.iou_sum[0] += frames * pixels / (pixels + AVSS_EPS)
        self.f_sum[0] += frames
        self.counts[0] += frames
        self.present[0] += frames
        self.padded_frames += frames

    def merge(self, other: SemanticMetrics) -> None:
        """Add ``other``'s sums and counts. Float sums depend on their order: merging per-video metrics in one fixed
        order gives the same bits however the videos were shared out (``evaluate``)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge metrics of {other.num_classes} classes into {self.num_classes}")
        self.iou_sum += other.iou_sum
        self.f_sum += other.f_sum
        self.counts += other.counts
        self.present += other.present
        self.frames += other.frames
        self.padded_frames += other.padded_frames
        self.videos += other.videos

    def result(self) -> dict:
        """{"miou", "fscore", "videos", "frames", "padded_frames", "per_class": {"iou", "fscore", "frames",
        "present"}}: "frames" counts the frames where the class was predicted or labelled (its mean's divisor),
        "present" those whose ground truth holds it (0: a class never in the split)."""
        counts = self.counts.double()
        iou = torch.nan_to_num(self.iou_sum / counts, nan=0.0)
        f = torch.nan_to_num(self.f_sum / counts, nan=0.0)
        return {"miou": float(iou.mean()), "fscore": float(f.mean()), "videos": self.videos, "frames": self.frames,
                "padded_frames": self.padded_frames,
                "per_class": {"iou": [_finite(v) for v in iou.tolist()], "fscore": [_finite(v) for v in f.tolist()],
                              "frames": self.counts.tolist(), "present": self.present.tolist()}}


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value
