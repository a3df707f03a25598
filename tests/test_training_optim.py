"""av2ts_cli/training/optim.py: the reference's parameter groups and the poly schedule."""

from __future__ import annotations

import pytest
import torch

from av2ts_cli.config import get_preset
from av2ts_cli.model import build_model
from av2ts_cli.training.optim import PolySchedule, parameter_groups


def test_parameter_groups_follow_the_reference_rules():
    model = build_model(get_preset("av2ts-tiny", "s4", siam=True))
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(setting)  # each parameter once
    assert not any(n.startswith("audio_encoder.") and id(p) in setting for n, p in params.items())  # frozen
    assert {n for n, p in params.items() if id(p) not in setting} == {n for n in params
                                                                     if n.startswith("audio_encoder.")}
    assert setting[id(params["backbone.conv1.weight"])] == pytest.approx((1e-5, 0.05))
    assert setting[id(params["siam_backbone.conv1.weight"])] == pytest.approx((1e-5, 0.05))
    assert setting[id(params["backbone.bn1.weight"])] == pytest.approx((1e-5, 0.0))  # norm: no decay
    assert setting[id(params["decoder.query_embed.weight"])] == pytest.approx((1e-4, 0.0))  # embedding: no decay
    assert setting[id(params["decoder.class_embed.weight"])] == pytest.approx((1e-4, 0.05))  # a Linear
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) and not n.startswith("audio")]
    assert norms and all(setting[id(params[f"{n}.weight"])][1] == 0.0 for n in norms)


def test_poly_schedule():
    schedule = PolySchedule(100, 0.9)
    assert schedule(0) == 1.0 and schedule(100) == 0.0 and schedule(50) == pytest.approx(0.5**0.9)
