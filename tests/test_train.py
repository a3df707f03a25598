"""`av2ts train` (av2ts_cli/train.py): the recipe's parts, a real CPU training run on synthetic S4 data scored by
`av2ts eval`, bit-for-bit resume after SIGKILL and SIGTERM, two-process DDP against one process, failure paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.config import get_preset
from av2ts_cli.model import build_model
from av2ts_cli.train import (
    LOG_FILE,
    TRAINER_FILE,
    ClipOrder,
    PolySchedule,
    parameter_groups,
    read_log,
    read_trainer_state,
    rng_state,
    set_rng_state,
)

runner = CliRunner()

# The CI recipe: synthetic S4 at the tiny model's input size, and av2ts-tiny's own recipe (RECIPES) for training.
SYNTH_OPTIONS = ["--videos", "192", "--val", "24", "--test", "2", "--size", "128", "--seed", "0", "--no-maskiges"]
TRAIN_OPTIONS = ["--model", "av2ts-tiny", "--eval-every", "0", "--workers", "1", "--seed", "0"]


def _invoke(args: list[str], expect: int = 0):
    cli._state["debug"] = False
    result = runner.invoke(cli.app, args)
    assert result.exit_code == expect, result.output
    return result


def _synth(root: Path, *options: str) -> Path:
    _invoke(["data", "synth", "--subset", "s4", "--out", str(root), *options])
    return root


def _cli_command() -> list[str]:
    return [sys.executable, "-m", "av2ts_cli"]


# --------------------------------------------------------------------------------------------------- the parts
def test_clip_order_depends_only_on_position_and_splits_the_global_batch():
    one = ClipOrder(num_clips=7, batch=4, seed=3)
    ranks = [ClipOrder(num_clips=7, batch=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for iteration in range(6):
        clips = one.clips(iteration)
        assert ranks[0].clips(iteration) + ranks[1].clips(iteration) == clips  # same global batch, sliced
        assert ClipOrder(7, 4, 3).clips(iteration) == clips  # a fresh order (a resumed run) agrees
    stream = [c for i in range(7) for c in one.clips(i)]  # 28 positions = 4 epochs of 7 clips
    for epoch in range(4):
        part = stream[7 * epoch: 7 * (epoch + 1)]
        assert {e for e, _ in part} == {epoch} and sorted(i for _, i in part) == list(range(7))
    assert [i for _, i in stream[:7]] != [i for _, i in stream[7:14]]  # a new permutation per epoch
    assert ClipOrder(7, 4, 4).clips(0) != one.clips(0)
    with pytest.raises(Exception, match="multiple of the number of processes"):
        ClipOrder(7, 3, 0, rank=0, world_size=2)


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


def test_poly_schedule_and_rng_state_round_trip(tmp_path):
    schedule = PolySchedule(100, 0.9)
    assert schedule(0) == 1.0 and schedule(100) == 0.0 and schedule(50) == pytest.approx(0.5**0.9)
    torch.manual_seed(1)
    np.random.seed(2)
    state = rng_state()
    torch.save(state, tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True))  # plain values only: weights_only loads it
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]
