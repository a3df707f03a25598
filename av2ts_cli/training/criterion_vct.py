"""VCT's training loss (spec ``vct.md`` section 11): the Hungarian-matched set losses of ``criterion.SetCriterion``
(class, mask and Dice terms with deep supervision; the inter-frame cosine loss is off, weight 0), held as a part
(``criterion.build_criterion`` builds both), plus the PAC
term, once per step, for a network with prototypes (S4 and AVSS; MS3's VCQ has none).

The PAC term ("loss_proto", weight ``LossConfig.prototype_weight``, 1.0) reads the network's ``pac`` output
(``model.vct.PrototypeAlignment``): for each supervised frame, logits = exp(logit_scale) x the cosine similarity of
the frame's mean audio token with each prototype (both projected and L2-normalised), and targets

- S4 (two classes): a one-hot of the clip's S4 category, from the dataset's metadata (``targets["category"]``, the
  category names of the batch's clips), in the reference's numbering of the 23 categories (``VCT_S4_CATEGORIES``);
- AVSS: a multi-hot of the classes present in the frame's label (background included, 255 excluded).

The loss is the binary cross-entropy with logits, averaged over frames x prototypes. ``logit_scale`` is a parameter
of the network (the reference keeps it in its criterion; either way the optimiser trains it). The frames are the
batch's supervised ones: frame 0 of an S4 training clip (the reference's first frame of each clip), the flagged
frames of AVSS; an AVSS frame whose pixels are all 255 gets an all-zero target, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from av2ts_cli.avsbench import IGNORE_INDEX
from av2ts_cli.errors import UsageError

# The reference's numbering of the S4 categories (prototype k stands for the category numbered k + 1 there), which
# is not the order of the category list in classes.S4_CATEGORIES: a converted checkpoint's prototypes follow it.
VCT_S4_CATEGORIES = (
    "helicopter", "mynah_bird_singing", "typing_on_computer_keyboard", "playing_violin", "playing_glockenspiel",
    "playing_piano", "lions_roaring", "baby_laughter", "male_speech", "lawn_mowing", "playing_ukulele",
    "playing_tabla", "driving_buses", "cap_gun_shooting", "chainsawing_trees", "playing_acoustic_guitar",
    "cat_meowing", "female_singing", "ambulance_siren", "dog_barking", "horse_clip-clop", "coyote_howling",
    "race_car",
)


def prototype_targets(masks: torch.Tensor, supervised: torch.Tensor, num_prototypes: int,
                      categories: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """masks int64 [B, T, H, W] (255 = no label), supervised bool [B, T], the clips' S4 category names (binary
    subsets) or None (AVSS) -> (rows [N] of the supervised frames (b*T + t), targets float [N, num_prototypes])."""
    b, t = supervised.shape
    rows = supervised.flatten().nonzero().squeeze(1)
    targets = torch.zeros(rows.shape[0], num_prototypes, device=masks.device)
    if categories is not None:  # S4: the clip's category, one-hot
        if len(categories) != b:
            raise UsageError(f"targets['category'] names {len(categories)} clips for a batch of {b}")
        index = []
        for name in categories:
            if name not in VCT_S4_CATEGORIES:
                raise UsageError(f"S4 category {name!r} is not one of the 23 S4 categories that VCT's prototypes "
                                 "stand for (the metadata's category column); VCT's S4 training needs each clip's")
            index.append(VCT_S4_CATEGORIES.index(name))
        if num_prototypes != len(VCT_S4_CATEGORIES):
            raise UsageError(f"the network has {num_prototypes} prototypes; S4's PAC term needs one per S4 category "
                             f"({len(VCT_S4_CATEGORIES)})")
        clip_category = torch.tensor(index, dtype=torch.int64, device=masks.device)
        targets[torch.arange(rows.shape[0], device=masks.device), clip_category[rows // t]] = 1.0
        return rows, targets
    labels = masks.flatten(0, 1)[rows].flatten(1)  # [N, H*W]: AVSS, the classes present in each frame
    present = torch.zeros(rows.shape[0], max(num_prototypes, IGNORE_INDEX + 1), device=masks.device)
    present.scatter_(1, labels, 1.0)
    if present[:, num_prototypes:IGNORE_INDEX].any():
        raise UsageError(f"target masks hold classes past the {num_prototypes} prototypes")
    return rows, present[:, :num_prototypes]


def prototype_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits, targets: [N, K] -> the binary cross-entropy with logits averaged over N x K (0 for N = 0, with the
    graph kept: DistributedDataParallel needs every parameter's gradient)."""
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


class VCTCriterion(nn.Module):
    """The set losses of ``set_criterion`` (``criterion.SetCriterion``, which ``criterion.build_criterion`` makes
    and hands in) plus VCT's ``loss_proto`` (see the module docstring). targets: "masks", "supervised" as
    ``SetCriterion``'s, and "category" (the B clips' S4 category names) for an S4 network."""

    def __init__(self, set_criterion: nn.Module, prototype_weight: float = 1.0):
        super().__init__()
        self.set_criterion = set_criterion
        self.num_classes = set_criterion.num_classes
        self.prototype_weight = float(prototype_weight)

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        losses = self.set_criterion(outputs, targets)
        pac = outputs.get("pac")
        if pac is None:  # VCQ (MS3): no prototypes, no PAC term
            return losses
        logits = pac["logits"]
        masks, supervised = targets["masks"].to(logits.device), targets["supervised"].to(logits.device)
        categories = None
        if self.num_classes == 2:
            categories = targets.get("category")
            if categories is None or any(not name for name in categories):
                raise UsageError("VCT's S4 prototype term needs each clip's S4 category (the metadata's category "
                                 "column); these clips have none (MS3 data? train a VCT MS3 network on it)")
        rows, wanted = prototype_targets(masks, supervised, logits.shape[1], categories)
        losses["loss_proto"] = self.prototype_weight * prototype_loss(logits[rows], wanted)
        return losses
