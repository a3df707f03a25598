"""av2ts_cli/training/optim.py: the reference's parameter groups and the poly schedule (its horizon moved on resume)."""

from __future__ import annotations

import pytest
import torch

from av2ts_cli.config import get_preset
from av2ts_cli.model import build_model
from av2ts_cli.training.optim import PolySchedule, parameter_groups, set_poly_horizon


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


def _scheduled(iters: int, power: float = 0.9):
    """An optimizer with two LR groups (as the backbone multiplier makes) under LambdaLR(PolySchedule(iters))."""
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 1e-4}, {"params": params[1:], "lr": 1e-3}], lr=1e-3)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, PolySchedule(iters, power))


def _stepped(iters: int, steps: int):
    optimizer, scheduler = _scheduled(iters)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def _restored(saved_optimizer, saved_scheduler, iters: int):
    """A new optimizer and schedule (built with ``iters``) with the saved states loaded, as a resumed run's."""
    optimizer, scheduler = _scheduled(iters)
    optimizer.load_state_dict(saved_optimizer.state_dict())
    scheduler.load_state_dict(saved_scheduler.state_dict())
    return optimizer, scheduler


def test_a_restored_poly_schedule_follows_a_new_horizon():
    """Restored at step 3 of a finished 3-iteration schedule (LR 0), moved to 6 iterations: the LR the next step
    uses and every later one is base * (1 - k / 6) ** 0.9, per group (without set_poly_horizon it stays 0)."""
    saved = _stepped(3, 3)
    assert [g["lr"] for g in saved[0].param_groups] == [0.0, 0.0]
    optimizer, scheduler = _restored(*saved, iters=6)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]  # restored: the old horizon's end
    set_poly_horizon(scheduler, 6, 0.9)
    for k in range(3, 7):
        expected = [base * (1 - k / 6) ** 0.9 for base in (1e-4, 1e-3)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected, rel=1e-12, abs=0), k
        assert scheduler.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=0), k
        assert scheduler.last_epoch == k
        optimizer.step()
        scheduler.step()
    assert scheduler.state_dict()["lr_lambdas"][0] == {"iters": 6, "power": 0.9}  # a later resume keeps 6


def test_a_restored_poly_schedule_with_its_own_horizon_is_unchanged():
    """Resumed with the same --iters: the LRs and the schedule's state are exactly the saved ones, and the next
    steps give exactly the LRs of the uninterrupted schedule."""
    straight = _stepped(10, 7)
    saved = _stepped(10, 4)
    optimizer, scheduler = _restored(*saved, iters=10)
    before = ([g["lr"] for g in optimizer.param_groups], scheduler.get_last_lr(), scheduler.state_dict())
    set_poly_horizon(scheduler, 10, 0.9)
    assert ([g["lr"] for g in optimizer.param_groups], scheduler.get_last_lr(), scheduler.state_dict()) == before
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in straight[0].param_groups]
    assert scheduler.state_dict() == straight[1].state_dict()


def test_avsegformer_groups_are_adamw_over_every_trainable_parameter():
    """The reference's ``AdamW(model.parameters(), lr=2e-5)``: one LR and weight decay for every parameter, norms
    included (``decay_norms``); the frozen VGGish has no gradient, so leaving it out changes nothing."""
    from av2ts_cli.training.optim import build_optimizer

    model = build_model(get_preset("avsegformer-tiny", "s4"))
    optimizer = build_optimizer(model, 2e-5, weight_decay=0.01, backbone_lr_mult=1.0, decay_norms=True)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(2e-5, 0.01)]
    held = {id(p) for p in optimizer.param_groups[0]["params"]}
    expected = {id(p) for n, p in model.named_parameters() if not n.startswith("audio_encoder.")}
    assert held == expected and len(held) == len(optimizer.param_groups[0]["params"])
    # a backbone frozen before the groups are made would be left out of the optimizer: the trainer freezes after
    model.freeze_backbone(True)
    frozen = {id(p) for g in parameter_groups(model, 2e-5, 0.01, 1.0, decay_norms=True) for p in g["params"]}
    assert not frozen & {id(p) for p in model.backbone.parameters()}


def test_poly_power_0_is_a_constant_lr():
    schedule = PolySchedule(10, 0.0)
    assert [schedule(i) for i in (0, 5, 10, 20)] == [1.0, 1.0, 1.0, 1.0]


def test_vct_parameter_groups_are_the_references():
    """VCT (spec vct.md section 11; Mask2Former's build_optimizer): both Swins (frames and maskiges) at lr x0.1;
    weight decay 0 on every norm layer, every embedding (queries, levels, prototypes) and Swin's relative-position
    tables; the PAC term's logit scale trained like any other parameter (lr 1e-4, decay 0.05, as the reference's
    criterion.logit_scale); the frozen VGGish left out."""
    model = build_model(get_preset("vct-tiny", "s4", siam=True))
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if id(p) not in setting} == {n for n in params
                                                                     if n.startswith("audio_encoder.")}
    tables = [n for n in params if n.endswith("relative_position_bias_table")]
    assert len(tables) == 16  # 8 blocks in each of the two Swins
    for name in tables:
        assert setting[id(params[name])] == pytest.approx((1e-5, 0.0)), name
    for prefix in ("backbone.", "siam_backbone."):
        assert setting[id(params[prefix + "patch_embed.proj.weight"])] == pytest.approx((1e-5, 0.05))
        assert setting[id(params[prefix + "patch_embed.norm.weight"])] == pytest.approx((1e-5, 0.0))
        assert setting[id(params[prefix + "stage_norms.0.weight"])] == pytest.approx((1e-5, 0.0))  # norm0..2
    for name in ("queries.prototypes.weight", "decoder.query_feat.weight", "decoder.query_embed.weight",
                 "decoder.level_embed.weight", "queries.prototype_norm.weight"):
        assert setting[id(params[name])] == pytest.approx((1e-4, 0.0)), name
    for name in ("alignment.logit_scale", "alignment.audio_proj.weight", "queries.query_mixer.layers.0.weight",
                 "audio_mlp.layers.0.weight", "siam_gates.gates.0.fc1.weight", "pixel_decoder.level_embed"):
        assert setting[id(params[name])] == pytest.approx((1e-4, 0.05)), name
    norms = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    assert norms and all(setting[id(params[f"{n}.weight"])][1] == 0.0 for n in norms)


def test_a_per_frame_network_steps_on_its_supervised_frames_alone():
    """VCT's frames never meet (``frames_independent``): the step runs only the supervised frames (frame 0 of an S4
    training clip), with the losses and gradients of the whole batch."""
    from av2ts_cli.training.criterion import build_criterion
    from av2ts_cli.training.optim import optimisation_step, supervised_frames

    cfg = get_preset("vct-tiny", "s4")
    size = cfg.input_size
    batch = {"frames": torch.randint(0, 256, (2, 3, 3, size, size), dtype=torch.uint8),
             "audio": torch.randn(2, 3, 96, 64), "masks": torch.zeros(2, 3, size, size, dtype=torch.int64),
             "supervised": torch.tensor([[True, False, False], [True, False, True]]),
             "category": ["dog_barking", "helicopter"], "video": ["a", "b"]}
    batch["masks"][:, :, 20:70, 30:90] = 1
    cut = supervised_frames(batch)
    assert cut["frames"].shape == (3, 1, 3, size, size) and cut["supervised"].all()
    assert cut["category"] == ["dog_barking", "helicopter", "helicopter"] and cut["video"] == ["a", "b", "b"]
    assert torch.equal(cut["frames"][2, 0], batch["frames"][1, 2])

    def step(frames_independent: bool) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        model = build_model(cfg).eval()  # eval: no Gumbel noise, so both runs draw the same random points
        model.frames_independent = frames_independent
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        losses = optimisation_step(model, build_criterion(cfg), optimizer, scheduler,
                                   torch.amp.GradScaler("cpu", enabled=False), batch, torch.device("cpu"), False, 0.0)
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = step(False)
    alone, alone_grads = step(True)
    assert torch.allclose(alone, whole, rtol=1e-4, atol=1e-5)
    assert whole_grads.keys() == alone_grads.keys()
    for name, grad in whole_grads.items():
        assert torch.allclose(alone_grads[name], grad, rtol=1e-3, atol=1e-6), name
