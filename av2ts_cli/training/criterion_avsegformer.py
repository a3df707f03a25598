"""AVSegFormer's training loss, as the reference's ``scripts/{s4,ms3,avss}/loss.py`` (vvvb-github/AVSegFormer at
7083cb6): a per-pixel loss on the network's logits plus 0.1 x the "mix" loss on its mask feature.

- **S4 / MS3** (one sigmoid logit per pixel): Dice on sigmoid(logits) against the object mask, per frame
  ``1 - 2 sum(p g) / ((sum(p^2) + 0.001) + (sum(g^2) + 0.001))``, averaged over the supervised frames. The reference
  takes frame 0 of every clip for S4 (its training clips have only that label) and all 5 frames for MS3: here the
  frames are the batch's ``supervised`` ones, which is frame 0 for S4 training clips and every frame for MS3
  (``data.datasets``, "supervised").
- **AVSS** (K logits per pixel): per-pixel cross-entropy over the K classes, averaged per frame, multiplied by the
  temporal flag, summed and divided by the flag's sum. The flag is the reference's ``gt_temporal_mask_flag``, here
  ``supervised``: padded slots (and frames without a label) weigh 0.
- **Mix loss** (all subsets), weight ``MIX_WEIGHT`` = 0.1: the same Dice on sigmoid of the mask feature's channel
  mean [N, 1, H/4, W/4], bilinearly upsampled (align_corners=False) to the label size, against the object mask
  (AVSS: label > 0, every non-background class), averaged over the flagged frames as the main term.

Pixels labelled 255 (no label, or the padding of an augmentation): by default they are background (0 in the Dice
targets; in the cross-entropy they add 0 but still count in the per-frame mean over all pixels, the reference's
``.mean(-1).mean(-1)``), as ``criterion.SetCriterion`` treats them. With ``ignore_padding`` they weigh 0: the Dice
sums and the cross-entropy mean run over labelled pixels only.

The loss computes in float32 whatever the caller's autocast. Keys: ``loss_dice`` (S4/MS3) or ``loss_ce`` (AVSS),
and ``loss_mix`` (already multiplied by its weight); the total loss is their sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.avsbench import IGNORE_INDEX
from av2ts_cli.errors import UsageError

MIX_WEIGHT = 0.1  # the reference's weight_dict["mix_loss"] in every config
DICE_EPS = 0.001  # added to each of the two sums of squares in the reference's Dice


def reference_dice(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """probs, targets: [N, ...] -> [N], the reference's per-sample Dice loss
    ``1 - 2 sum(p g) / ((sum(p^2) + 0.001) + (sum(g^2) + 0.001))`` over each sample's elements."""
    probs, targets = probs.flatten(1), targets.flatten(1)
    overlap = (probs * targets).sum(-1)
    return 1 - 2 * overlap / ((probs * probs).sum(-1) + DICE_EPS + (targets * targets).sum(-1) + DICE_EPS)


def flagged_mean(values: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """values, flag: [N] -> sum(values * flag) / sum(flag), the reference's masked mean over frames."""
    return (values * flag).sum() / flag.sum()


class AVSegFormerCriterion(nn.Module):
    """``criterion(outputs, targets) -> {name: weighted loss}`` for the AVSegFormer family (see the module docstring).

    outputs (the network's): "logits" [B*T, O, H, W] (O = 1 for a binary subset, K for AVSS), "mask_features"
    [B*T, C, h, w]; rows frame-major (b*T + t). targets: "masks" int64 [B, T, H', W'] class indices (255 = no
    label), "supervised" bool [B, T] (the frames the losses see). Logits of another size than the labels are
    upsampled bilinearly to it first (training labels are at the input size, so this does not happen in ``train``).
    """

    def __init__(self, num_classes: int, ignore_padding: bool = False, mix_weight: float = MIX_WEIGHT):
        super().__init__()
        self.num_classes = int(num_classes)
        self.channels = 1 if self.num_classes == 2 else self.num_classes  # model.avsegformer.output_channels
        self.ignore_padding = bool(ignore_padding)
        self.mix_weight = float(mix_weight)

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        logits, features = outputs["logits"], outputs["mask_features"]
        masks, supervised = targets["masks"], targets["supervised"]
        self._check(logits, features, masks, supervised)
        labels = masks.to(logits.device).flatten(0, 1)  # [N, H, W]
        flag = supervised.to(logits.device).flatten().float()  # [N]
        main = "loss_dice" if self.channels == 1 else "loss_ce"
        if not flag.any():  # nothing supervised: zeros that keep the graph (DDP needs every parameter's gradient)
            zero = logits.float().sum() * 0.0 + features.float().sum() * 0.0
            return {main: zero, "loss_mix": zero}
        keep = flag.nonzero().squeeze(1)  # only the flagged frames' terms are computed (the rest weigh 0)
        labels, flag = labels[keep], flag[keep]
        size = labels.shape[-2:]
        logits = logits[keep].float()
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        valid = (labels != IGNORE_INDEX).float()
        foreground = ((labels > 0) & (labels != IGNORE_INDEX)).float()  # binary: class 1; AVSS: any sounding class
        weights = valid if self.ignore_padding else None

        if self.channels == 1:
            main_loss = flagged_mean(self._dice(logits[:, 0], foreground, weights), flag)
        else:
            ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")  # [n, H, W]
            if weights is None:
                per_frame = ce.flatten(1).mean(1)
            else:  # a frame without a labelled pixel adds 0
                per_frame = ce.flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1.0)
            main_loss = flagged_mean(per_frame, flag)

        mix = features[keep].float().mean(1, keepdim=True)  # [n, 1, h, w]
        mix = F.interpolate(mix, size=size, mode="bilinear", align_corners=False)[:, 0]
        mix_loss = flagged_mean(self._dice(mix, foreground, weights), flag)
        return {main: main_loss, "loss_mix": self.mix_weight * mix_loss}

    @staticmethod
    def _dice(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        probs = logits.sigmoid()
        if weights is not None:
            probs, targets = probs * weights, targets * weights
        return reference_dice(probs, targets)

    def _check(self, logits: torch.Tensor, features: torch.Tensor, masks: torch.Tensor,
               supervised: torch.Tensor) -> None:
        if masks.dim() != 4 or masks.dtype != torch.int64:
            raise UsageError(f"targets['masks'] must be int64 [B, T, H, W], got {masks.dtype} {list(masks.shape)}")
        b, t = masks.shape[:2]
        if tuple(supervised.shape) != (b, t) or supervised.dtype != torch.bool:
            raise UsageError(f"targets['supervised'] must be bool [{b}, {t}], got {supervised.dtype} "
                             f"{list(supervised.shape)}")
        if logits.dim() != 4 or logits.shape[0] != b * t or logits.shape[1] != self.channels:
            raise UsageError(f"logits must be [B*T, O, H, W] = [{b * t}, {self.channels}, H, W], "
                             f"got {list(logits.shape)}")
        if features.dim() != 4 or features.shape[0] != b * t:
            raise UsageError(f"mask_features must be [B*T, C, h, w] with B*T = {b * t}, got {list(features.shape)}")
        if self.channels > 1:
            labelled = masks[masks != IGNORE_INDEX]
            if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= self.num_classes):
                raise UsageError(f"target masks hold classes outside 0..{self.num_classes - 1} "
                                 f"(or {IGNORE_INDEX}, no label)")
