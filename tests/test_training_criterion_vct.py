"""av2ts_cli/training/criterion_vct.py: VCT's PAC term on hand-checked small cases (S4's one-hot category in the
reference's numbering, AVSS's multi-hot classes, the learnable logit scale and its gradient), and the criterion
around it (the set losses without the cosine term, the prototype term once per step, its errors)."""

from __future__ import annotations

import math

import pytest
import torch

from av2ts_cli.config import get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.model import build_model
from av2ts_cli.model.vct import PrototypeAlignment
from av2ts_cli.training.criterion import build_criterion
from av2ts_cli.training.criterion_vct import (
    VCT_S4_CATEGORIES,
    VCTCriterion,
    prototype_loss,
    prototype_targets,
)


def _alignment_by_hand() -> PrototypeAlignment:
    """Width 2, both projections the identity, logit_scale ln 2 (so exp(logit_scale) = 2)."""
    alignment = PrototypeAlignment(2)
    with torch.no_grad():
        alignment.audio_proj.weight.copy_(torch.eye(2))
        alignment.proto_proj.weight.copy_(torch.eye(2))
        alignment.logit_scale.fill_(math.log(2.0))
    return alignment


def test_the_pac_term_of_an_avss_frame_by_hand():
    """One AVSS frame whose label holds classes 0 and 2 of K = 3, and a 255 pixel (no class).

    Audio tokens all (1, 0): their mean, normalised, is a = (1, 0). Prototypes (3, 0), (0, 5), (-1, 0): normalised
    (1, 0), (0, 1), (-1, 0), cosines with a 1, 0, -1; times exp(ln 2) = 2: logits x = (2, 0, -2).
    Targets (multi-hot of the classes present, 255 left out): y = (1, 0, 1).
    BCE with logits: y = 1 -> ln(1 + e^-x), y = 0 -> ln(1 + e^x):
      ln(1 + e^-2) = 0.126928, ln(1 + e^0) = ln 2 = 0.693147, ln(1 + e^2) = 2.126928;
      mean = (0.126928 + 0.693147 + 2.126928) / 3 = 2.947003 / 3 = 0.982334.
    Gradient on logit_scale s (x_k = e^s c_k): dL/ds = sum_k (sigmoid(x_k) - y_k) c_k e^s / 3
      = 2/3 [(0.880797 - 1) * 1 + (0.5 - 0) * 0 + (0.119203 - 1) * (-1)] = 2/3 * 0.761594 = 0.507729."""
    alignment = _alignment_by_hand()
    tokens = torch.zeros(1, 2, 6, 4)
    tokens[:, 0] = 1.0
    pac = alignment(tokens, torch.tensor([[3.0, 0.0], [0.0, 5.0], [-1.0, 0.0]]))
    assert pac["logits"][0].tolist() == pytest.approx([2.0, 0.0, -2.0], abs=1e-6)

    label = torch.tensor([[[[0, 2], [2, 255]]]])  # [B=1, T=1, 2, 2]
    rows, targets = prototype_targets(label, torch.ones(1, 1, dtype=torch.bool), 3, None)
    assert rows.tolist() == [0] and targets.tolist() == [[1.0, 0.0, 1.0]]
    loss = prototype_loss(pac["logits"][rows], targets)
    assert loss.item() == pytest.approx(0.982334, abs=1e-6)
    loss.backward()
    assert alignment.logit_scale.grad.item() == pytest.approx(0.507729, abs=1e-6)


def test_the_pac_term_of_s4_clips_by_hand():
    """Two S4 clips of T = 2 frames, frame 0 supervised (an S4 training clip), categories "race_car" and
    "helicopter": the reference numbers them 23 and 1, so their one-hot sits on prototype 22 and 0 (not on their
    places in classes.S4_CATEGORIES). Logits: 2 on the clip's own prototype, 0 on the other 22.
    Per clip: (ln(1 + e^-2) + 22 ln 2) / 23 = (0.126928 + 15.249238) / 23 = 15.376166 / 23 = 0.668529, and both
    clips alike: the mean over 2 x 23 terms is 0.668529."""
    assert (VCT_S4_CATEGORIES[0], VCT_S4_CATEGORIES[22], VCT_S4_CATEGORIES[7]) == \
        ("helicopter", "race_car", "baby_laughter")
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.int64)
    supervised = torch.tensor([[True, False], [True, False]])
    rows, targets = prototype_targets(masks, supervised, 23, ["race_car", "helicopter"])
    assert rows.tolist() == [0, 2]  # frame 0 of each clip (rows b*T + t)
    assert targets.nonzero().tolist() == [[0, 22], [1, 0]]
    logits = torch.zeros(4, 23)
    logits[0, 22] = logits[2, 0] = 2.0
    assert prototype_loss(logits[rows], targets).item() == pytest.approx(0.668529, abs=1e-6)


def test_prototype_targets_refuse_what_the_term_cannot_use():
    masks = torch.zeros(1, 1, 2, 2, dtype=torch.int64)
    one = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(UsageError, match="'trumpet' is not one of the 23 S4 categories"):
        prototype_targets(masks, one, 23, ["trumpet"])
    with pytest.raises(UsageError, match="needs one per S4 category"):
        prototype_targets(masks, one, 5, ["helicopter"])
    with pytest.raises(UsageError, match="classes past the 3 prototypes"):
        prototype_targets(masks + 4, one, 3, None)
    empty = prototype_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3))
    assert empty.item() == 0.0 and empty.requires_grad  # nothing supervised: zero, the graph kept


def _tiny_outputs(subset: str, siam: bool = False):
    cfg = get_preset("vct-tiny", subset, siam=siam)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    size = cfg.input_size
    outputs = model(torch.rand(2, 2, 3, size, size) * 255, torch.randn(2, 2, 96, 64))
    return cfg, model, outputs


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_the_criterion_adds_the_pac_term_once_and_no_cosine_term(subset):
    cfg, model, outputs = _tiny_outputs(subset)
    criterion = build_criterion(cfg)
    assert isinstance(criterion, VCTCriterion) and criterion.prototype_weight == cfg.loss.prototype_weight == 1.0
    masks = torch.zeros(2, 2, cfg.input_size, cfg.input_size, dtype=torch.int64)
    masks[:, :, 10:40, 20:60] = 1 if subset == "s4" else 7
    supervised = torch.tensor([[True, False], [True, True]])
    targets = {"masks": masks, "supervised": supervised, "category": ["dog_barking", "cat_meowing"]}
    losses = criterion(outputs, targets)
    assert not any(k.startswith("loss_cosine") for k in losses)  # the recipe's cosine weight is 0
    assert [k for k in losses if k.startswith("loss_proto")] == ["loss_proto"]  # once per step
    assert sum(k.startswith("loss_ce") for k in losses) == cfg.decoder_layers + 1  # deep supervision
    categories = None if subset == "avss" else targets["category"]
    rows, wanted = prototype_targets(masks, supervised, cfg.num_prototypes, categories)
    assert losses["loss_proto"].item() == pytest.approx(
        prototype_loss(outputs["pac"]["logits"][rows], wanted).item(), rel=1e-6)
    sum(losses.values()).backward()
    assert model.alignment.logit_scale.grad is not None and model.alignment.logit_scale.grad != 0


def test_an_s4_network_needs_the_clips_categories_and_ms3_has_no_pac_term():
    cfg, _, outputs = _tiny_outputs("s4")
    masks = torch.zeros(2, 2, cfg.input_size, cfg.input_size, dtype=torch.int64)
    supervised = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(UsageError, match="needs each clip's S4 category"):
        build_criterion(cfg)(outputs, {"masks": masks, "supervised": supervised, "category": ["", ""]})
    ms3, _, ms3_outputs = _tiny_outputs("ms3")
    assert "pac" not in ms3_outputs and ms3.num_prototypes == 0
    losses = build_criterion(ms3)(ms3_outputs, {"masks": masks, "supervised": supervised})
    assert "loss_proto" not in losses
