"""The AV2TS training criterion (docs/model.md, "Losses"): Hungarian-matched set losses on semantic masks with deep
supervision, plus the adaptive inter-frame cosine loss on the decoder's middle masks.

Its home is ``training/``, as SAM 2 keeps its loss functions in its training package: only training uses it (the
network, ``model/``, never does), and it needs the AVSBench label rules (``avsbench.IGNORE_INDEX``), which the
network does not.

Each supervised frame has SEMANTIC targets: one binary mask per class present in the frame (for S4/MS3 the
background, class 0, is a target like the sounding object). Predictions and targets are compared on sampled points,
never on whole masks (Mask2Former, PointRend): the matcher uses uniform random points shared by all queries and
targets of a frame; the mask losses use points chosen by importance sampling around each matched prediction's
uncertain pixels. Predictions (H/4) and targets (H) are sampled at the same normalised coordinates.

Pixels labelled 255 (the padding after a random resize below the input size, or "no label"): by default they are
0 in every class mask, so they count as negatives for every target in the matcher and in the mask and dice losses,
as in the reference (docs/model.md, "Training fidelity"). With ``ignore_padding`` they do not count: each sampled
point carries a weight, the labelled share of its bilinear neighbourhood (exactly 1 wherever a frame has no 255
pixel nearby), and a supervised frame with no labelled pixel at all is treated as unsupervised.

Mixed precision: the criterion runs under the caller's autocast, as the reference's; autocast is off for the
matcher's costs and the class loss, which compute in fp32. The point samples promote to fp32 (``point_sample``),
so the mask losses see fp32 values too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from av2ts_cli.avsbench import IGNORE_INDEX
from av2ts_cli.config import LossConfig, ModelConfig
from av2ts_cli.errors import UsageError
from av2ts_cli.training.criterion_avsegformer import AVSegFormerCriterion
from av2ts_cli.training.criterion_vct import VCTCriterion

_EPS = 1e-6  # floor of a sum of point weights (all points of a mask fell on ignore pixels)


def build_criterion(cfg: ModelConfig, ignore_padding: bool = False
                    ) -> SetCriterion | AVSegFormerCriterion | VCTCriterion:
    """The training criterion for a model config (its class count and ``cfg.loss`` settings); ``ignore_padding``:
    pixels labelled 255 do not count (default: they are negatives, as in the reference). The AVSegFormer family has
    its own (``criterion_avsegformer``: Dice or masked cross-entropy plus the mix loss); VCT adds its PAC term to the
    set losses (``criterion_vct``); every other family the Hungarian-matched set losses."""
    if cfg.family == "avsegformer":
        return AVSegFormerCriterion(cfg.num_classes, ignore_padding=ignore_padding)
    criterion = SetCriterion(cfg.num_classes, cfg.loss, ignore_padding=ignore_padding)
    if cfg.family == "vct":
        return VCTCriterion(criterion, cfg.loss.prototype_weight)
    return criterion


# ---------------------------------------------------------------------------------------------------------------
# point sampling


def point_sample(images: torch.Tensor, coords: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear samples of ``images`` [N, C, H, W] at ``coords`` [N, P, 2], (x, y) in [0, 1] over the whole image
    (pixel centres at (i + 0.5) / size) -> [N, C, P]. Resolution-free, so H/4 predictions and full-size targets
    are read at the same places. Images and coords of different float types are both sampled in the wider one
    (fp32 for bf16/fp16 predictions and fp32 points), as autocast does for the reference's ``grid_sample``."""
    if images.dtype != coords.dtype:
        wide = torch.promote_types(images.dtype, coords.dtype)
        images, coords = images.to(wide), coords.to(wide)
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False).squeeze(3)


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float) -> torch.Tensor:
    """PointRend importance sampling. logits: [N, 1, h, w] mask logits -> coords [N, num_points, 2] in [0, 1].

    Of ``num_points * oversample_ratio`` uniform candidates, the ``importance_sample_ratio * num_points`` most
    uncertain ones (uncertainty = -|logit|) come first; uniform random points fill the rest."""
    n = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(n, num_candidates, 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).squeeze(1).abs()  # [N, num_candidates]
    top = uncertainty.topk(num_uncertain, dim=1).indices
    uncertain = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([uncertain, uniform], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# mask losses and matching costs on sampled points. weights None: every point counts (the reference); else 1 on
# labelled points, 0 on ignore (``ignore_padding``)


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """logits, targets, weights: [M, P] -> [M], each mask's binary cross-entropy averaged over its points."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if weights is None:
        return bce.mean(1)
    return (bce * weights).sum(1) / weights.sum(1).clamp(min=_EPS)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """logits, targets, weights: [M, P] -> [M], 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) with p = sigmoid."""
    probs = logits.sigmoid()
    if weights is None:
        return 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    probs = probs * weights
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + (targets * weights).sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_bce_cost(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """logits [N, Q, P], targets [N, M, P], weights [N, P] or None -> [N, Q, M]: ``sigmoid_bce_loss`` of every
    query against every target of the same frame. BCE(x, t) = softplus(x) - x t, so the whole matrix is one
    softplus and two matrix products (the weights folded into the small right-hand sides)."""
    if weights is None:
        cost = F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.transpose(1, 2)
        return cost / logits.shape[-1]
    weighted_targets = targets * weights.unsqueeze(1)
    cost = F.softplus(logits) @ weights.unsqueeze(2) - logits @ weighted_targets.transpose(1, 2)
    return cost / weights.sum(1).clamp(min=_EPS)[:, None, None]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """logits [N, Q, P], targets [N, M, P], weights [N, P] or None -> [N, Q, M]: ``dice_loss`` of every pair."""
    probs = logits.sigmoid()
    if weights is None:
        numerator = 2 * probs @ targets.transpose(1, 2)
        denominator = probs.sum(-1, keepdim=True) + targets.sum(-1).unsqueeze(1)
        return 1 - (numerator + 1) / (denominator + 1)
    weighted_targets = targets * weights.unsqueeze(1)
    numerator = 2 * probs @ weighted_targets.transpose(1, 2)
    denominator = probs @ weights.unsqueeze(2) + weighted_targets.sum(-1).unsqueeze(1)
    return 1 - (numerator + 1) / (denominator + 1)


def inter_frame_cosine_loss(middle_masks: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The adaptive inter-frame consistency loss (COMBO's L_ada). middle_masks: [B*T, Q, L] mask logits, frame-major.

    With l_t = 1 - cos(m_t, m_t+1) between consecutive frames of a clip (all queries' masks flattened together):
    sum over clips and t of l_t * exp(-l_t), divided by B and by T - 1. The weight exp(-l_t) is not detached
    (as in the reference). A clip of one frame gives 0."""
    flat = middle_masks.float().reshape(-1, num_frames, middle_masks[0].numel())  # [B, T, Q*L]
    clips = flat.shape[0]
    if num_frames < 2:
        return flat.sum() * 0.0
    first = flat[:, :-1].reshape(-1, flat.shape[-1])
    second = flat[:, 1:].reshape(-1, flat.shape[-1])
    same = torch.ones(first.shape[0], device=flat.device)
    loss = F.cosine_embedding_loss(first, second, same, reduction="none")  # 1 - cos, [B*(T-1)]
    return (loss * torch.exp(-loss)).sum() / clips / (num_frames - 1)


# ---------------------------------------------------------------------------------------------------------------
# targets and matching


@dataclass
class SemanticTargets:
    """The semantic targets of a batch's supervised frames (with ``ignore_padding``: only those with at least one
    labelled pixel)."""

    rows: torch.Tensor  # [N] int64: output rows (b*T + t) of the supervised frames
    frame: torch.Tensor  # [M] int64: supervised frame (0..N-1) of each target; sorted
    labels: torch.Tensor  # [M] int64: class of each target; ascending within a frame
    masks: torch.Tensor  # [M, 1, H, W] float: 1 where the frame's label is the target's class (0 on 255)
    valid: torch.Tensor | None  # [N, 1, H, W] float: 1 where labelled (not 255); None: every pixel counts


def semantic_targets(masks: torch.Tensor, supervised: torch.Tensor, num_classes: int, ignore_padding: bool = False
                     ) -> SemanticTargets:
    """masks: int64 [B, T, H, W] class indices (255 = ignore); supervised: bool [B, T] -> SemanticTargets.

    A class is a target where it is present; 255 pixels are 0 in every class mask. By default they count (as
    negatives) and every supervised frame is kept, even one without a labelled pixel (its queries all learn
    no-object, as the reference's); ``ignore_padding``: ``valid`` marks the pixels that count, and frames without
    any are left out."""
    labels = masks.flatten(0, 1)  # [B*T, H, W]
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        value = int(labels[bad][0])
        raise UsageError(f"target masks hold class {value}; expected 0..{num_classes - 1} or {IGNORE_INDEX} (ignore)")
    keep = supervised.flatten().to(valid.device)
    if ignore_padding:
        keep = keep & valid.flatten(1).any(1)
    rows = keep.nonzero().squeeze(1)
    labels, valid = labels[rows], valid[rows]
    present = torch.zeros(rows.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels.masked_fill(~valid, num_classes).flatten(1), True)  # ignore -> extra column
    frame, classes = present[:, :num_classes].nonzero(as_tuple=True)  # row-major: by frame, then class
    target_masks = (labels[frame] == classes.view(-1, 1, 1)).float().unsqueeze(1)
    return SemanticTargets(rows, frame, classes, target_masks,
                           valid.float().unsqueeze(1) if ignore_padding else None)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to the targets of each frame (scipy ``linear_sum_assignment``) minimising
    class_weight * (-p(target class)) + mask_weight * BCE + dice_weight * dice, the mask costs on ``num_points``
    uniform random points per frame, in fp32 with autocast off (as the reference's matcher)."""

    def __init__(self, class_weight: float, mask_weight: float, dice_weight: float, num_points: int):
        super().__init__()
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def costs(self, logits: torch.Tensor, masks: torch.Tensor, targets: SemanticTargets) -> torch.Tensor:
        """logits: [N, Q, K+1] and masks: [N, Q, h, w] of the supervised frames -> fp32 [N, Q, W], the cost of
        query q for the w-th target of each frame (W: the most targets of a frame; columns past a frame's own
        count are padding)."""
        n, q = logits.shape[:2]
        device = logits.device
        counts = torch.bincount(targets.frame, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        width = int(counts.max()) if n else 0
        slot = torch.arange(targets.frame.shape[0], device=device) - starts[targets.frame]  # index within its frame

        points = torch.rand(n, self.num_points, 2, device=device)
        with torch.autocast(device_type=device.type, enabled=False):
            pred = point_sample(masks.float(), points)  # [N, Q, P]
            weights = None
            if targets.valid is not None:
                weights = point_sample(targets.valid, points, padding_mode="border").squeeze(1)  # [N, P]
            target_points = torch.zeros(n, width, self.num_points, device=device)
            if width:
                target_points[targets.frame, slot] = point_sample(targets.masks, points[targets.frame]).squeeze(1)
            target_labels = torch.zeros(n, width, dtype=torch.int64, device=device)
            target_labels[targets.frame, slot] = targets.labels

            probs = logits.float().softmax(-1)
            class_cost = -probs.gather(2, target_labels.unsqueeze(1).expand(n, q, width))
            return (self.class_weight * class_cost
                    + self.mask_weight * pairwise_bce_cost(pred, target_points, weights)
                    + self.dice_weight * pairwise_dice_cost(pred, target_points, weights))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, masks: torch.Tensor, targets: SemanticTargets
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [N, Q, K+1] and masks: [N, Q, h, w] of the supervised frames -> (query [M'], target [M']) int64,
        the matched pairs, ``target`` indexing ``targets.labels``. Every target is matched unless a frame has more
        targets than queries."""
        device = logits.device
        counts = torch.bincount(targets.frame, minlength=logits.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        cost = self.costs(logits, masks, targets).cpu()
        queries, matched = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
        for i, (count, start) in enumerate(zip(counts.tolist(), starts.tolist(), strict=True)):
            rows, cols = linear_sum_assignment(cost[i, :, :count].numpy())
            queries.append(torch.as_tensor(rows, dtype=torch.int64))
            matched.append(torch.as_tensor(cols, dtype=torch.int64) + start)
        return torch.cat(queries).to(device), torch.cat(matched).to(device)


# ---------------------------------------------------------------------------------------------------------------
# the criterion


class SetCriterion(nn.Module):
    """``criterion(outputs, targets) -> {name: weighted loss}``; the total loss is the sum of the values.

    outputs (the model's): "pred_logits" [B*T, Q, K+1], "pred_masks" [B*T, Q, h, w], optional "aux_outputs" (list
    of the same two), optional "middle_masks" (list of [B*T, Q, h*w]); rows are frame-major (b*T + t).
    targets: "masks" int64 [B, T, H, W] class indices at the input size (255 = ignore), "supervised" bool [B, T].

    Keys: loss_ce, loss_mask, loss_dice (last layer), the same with _0.._{n-1} for the aux outputs, and
    loss_cosine_0.._{m-1} for the middle masks (none with a cosine weight of 0: VCT's recipe). Class, mask and
    dice terms see only supervised frames (S4 train: frame 0; MS3: all; AVSS: the label flags); the cosine terms see
    every frame. ``ignore_padding``: pixels labelled 255 do not count (default: they are negatives in every class
    mask, as in the reference).
    """

    def __init__(self, num_classes: int, loss: LossConfig | None = None, ignore_padding: bool = False):
        super().__init__()
        loss = loss or LossConfig()
        if loss.num_points < 1 or loss.oversample_ratio < 1 or not 0 <= loss.importance_sample_ratio <= 1:
            raise UsageError(f"loss config: need num_points >= 1, oversample_ratio >= 1 and importance_sample_ratio "
                             f"in [0, 1] (got {loss.num_points}, {loss.oversample_ratio}, "
                             f"{loss.importance_sample_ratio})")
        self.num_classes = num_classes
        self.loss = loss
        self.ignore_padding = bool(ignore_padding)
        self.matcher = HungarianMatcher(loss.class_weight, loss.mask_weight, loss.dice_weight, loss.num_points)
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = loss.no_object_weight
        self.register_buffer("empty_weight", class_weights, persistent=False)  # CE class weights, no-object last

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        masks, supervised = targets["masks"], targets["supervised"]
        b, t = self._check(outputs, masks, supervised)
        device = outputs["pred_logits"].device
        # under the caller's autocast, as the reference: the matcher and the class loss turn it off themselves
        semantic = semantic_targets(masks.to(device), supervised.to(device), self.num_classes, self.ignore_padding)
        num_masks = self._num_masks(semantic.labels.shape[0], device)
        losses = self._set_losses(outputs, semantic, num_masks)
        if self.loss.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                losses.update({f"{k}_{i}": v for k, v in self._set_losses(aux, semantic, num_masks).items()})
        for i, middle in enumerate((outputs.get("middle_masks") or []) if self.loss.cosine_weight else []):
            losses[f"loss_cosine_{i}"] = self.loss.cosine_weight * inter_frame_cosine_loss(middle, t)
        return losses

    def _set_losses(self, layer: dict, targets: SemanticTargets, num_masks: float) -> dict[str, torch.Tensor]:
        """Weighted class, mask and dice losses of one decoder layer's {"pred_logits", "pred_masks"}."""
        def zero() -> torch.Tensor:  # a zero that keeps the graph (DDP needs every parameter to get a gradient)
            return layer["pred_logits"].float().sum() * 0.0 + layer["pred_masks"].float().sum() * 0.0

        if targets.rows.shape[0] == 0:  # nothing supervised
            return {"loss_ce": zero(), "loss_mask": zero(), "loss_dice": zero()}
        logits = layer["pred_logits"][targets.rows]  # [N, Q, K+1]
        pred_masks = layer["pred_masks"][targets.rows]  # [N, Q, h, w]
        query, target = self.matcher(logits, pred_masks, targets)
        frame = targets.frame[target]

        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[frame, query] = targets.labels[target]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss_ce = F.cross_entropy(logits.float().transpose(1, 2), classes, self.empty_weight)
        if target.shape[0] == 0:  # supervised frames without any target: only the class loss (all no-object)
            return {"loss_ce": self.loss.class_weight * loss_ce, "loss_mask": zero(), "loss_dice": zero()}

        # the mask losses under the caller's autocast, as the reference's (point_sample promotes to fp32)
        matched = pred_masks[frame, query].unsqueeze(1)  # [M, 1, h, w]
        with torch.no_grad():
            coords = uncertain_point_coords(matched, self.loss.num_points, self.loss.oversample_ratio,
                                            self.loss.importance_sample_ratio)
            point_targets = point_sample(targets.masks[target], coords).squeeze(1)
            point_weights = None
            if targets.valid is not None:
                point_weights = point_sample(targets.valid[frame], coords, padding_mode="border").squeeze(1)
        point_logits = point_sample(matched, coords).squeeze(1)
        loss_mask = sigmoid_bce_loss(point_logits, point_targets, point_weights).sum() / num_masks
        loss_dice = dice_loss(point_logits, point_targets, point_weights).sum() / num_masks
        return {"loss_ce": self.loss.class_weight * loss_ce, "loss_mask": self.loss.mask_weight * loss_mask,
                "loss_dice": self.loss.dice_weight * loss_dice}

    @staticmethod
    def _num_masks(count: int, device: torch.device) -> float:
        """Target masks per process (averaged over DDP ranks, as Mask2Former), at least 1."""
        total = torch.tensor([float(count)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return max(float(total.item()), 1.0)

    def _check(self, outputs: dict, masks: torch.Tensor, supervised: torch.Tensor) -> tuple[int, int]:
        if masks.dim() != 4 or masks.dtype != torch.int64:
            raise UsageError(f"targets['masks'] must be int64 [B, T, H, W], got {masks.dtype} {list(masks.shape)}")
        b, t = masks.shape[:2]
        if tuple(supervised.shape) != (b, t) or supervised.dtype != torch.bool:
            raise UsageError(f"targets['supervised'] must be bool [{b}, {t}], got {supervised.dtype} "
                             f"{list(supervised.shape)}")
        layers = [outputs] + list(outputs.get("aux_outputs") or [])
        for layer in layers:
            logits, pred = layer["pred_logits"], layer["pred_masks"]
            if logits.dim() != 3 or logits.shape[0] != b * t or logits.shape[2] != self.num_classes + 1:
                raise UsageError(f"pred_logits must be [B*T, Q, K+1] = [{b * t}, Q, {self.num_classes + 1}], "
                                 f"got {list(logits.shape)}")
            if pred.dim() != 4 or tuple(pred.shape[:2]) != tuple(logits.shape[:2]):
                raise UsageError(f"pred_masks must be [B*T, Q, h, w] = [{b * t}, {logits.shape[1]}, h, w], "
                                 f"got {list(pred.shape)}")
        for middle in outputs.get("middle_masks") or []:
            if middle.shape[0] != b * t:
                raise UsageError(f"middle_masks must have B*T = {b * t} rows, got {list(middle.shape)}")
        return b, t
