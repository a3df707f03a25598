"""av2ts_cli/training/options.py: a new run's options and their checks (one-line usage errors through `av2ts
train`), and which options ``--resume`` may change."""

from __future__ import annotations

import pytest
import torch
from conftest import train_error

from av2ts_cli.errors import UsageError
from av2ts_cli.training.options import RESUME_FREE, TrainOptions, merge_resume_options, new_options


def test_bad_data_and_unknown_preset_are_one_line_errors(tmp_path, small_s4):
    train_error(["--subset", "s4", "--data", str(tmp_path / "nowhere"), "--model", "av2ts-tiny"], 1,
                str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    train_error(["--subset", "s4", "--data", str(empty), "--model", "av2ts-tiny"], 1, str(empty))
    train_error(["--subset", "s4", "--data", str(small_s4), "--model", "av2ts-huge"], 2, "av2ts-huge")
    train_error(["--data", str(small_s4)], 2, "--subset")
    train_error(["--subset", "s5", "--data", str(small_s4)], 2, "s5")
    train_error(["--subset", "s4", "--data", str(small_s4), "--model", "av2ts-tiny", "--batch", "0"], 2, "--batch")
    train_error(["--subset", "s4", "--data", str(small_s4), "--model", "av2ts-tiny", "--amp", "--device", "cpu"], 2,
                "--amp")


def test_resolved_fills_in_the_recipe_and_keeps_what_was_given():
    cpu = torch.device("cpu")
    tiny = new_options({"subset": "s4", "data": "d", "model": "av2ts-tiny"}).resolved("av2ts-tiny", cpu)
    assert (tiny.iters, tiny.batch, tiny.lr, tiny.clip_norm, tiny.augment, tiny.amp) == (3000, 2, 1e-3, 0.0, False,
                                                                                         False)
    given = new_options({"subset": "avss", "data": "d", "batch": 6, "lr": 3e-4}).resolved("av2ts-r50", cpu)
    assert (given.iters, given.batch, given.lr, given.amp) == (180_000, 6, 3e-4, False)  # recipe's AMP: CUDA only
    with pytest.raises(UsageError, match="unknown training option"):
        new_options({"subset": "s4", "data": "d", "learning_rate": 1.0})


def test_ignore_padding_is_off_unless_asked_and_fixed_for_a_run():
    """The reference's rule (255 pixels are negatives) by default; --ignore-padding is kept, and a resumed run may
    not change it (it changes the loss)."""
    cpu = torch.device("cpu")
    for preset in ("av2ts-r50", "av2ts-pvt", "av2ts-tiny"):
        assert new_options({"subset": "s4", "data": "d"}).resolved(preset, cpu).ignore_padding is False
    asked = new_options({"subset": "s4", "data": "d", "ignore_padding": True}).resolved("av2ts-r50", cpu)
    assert asked.ignore_padding is True
    with pytest.raises(UsageError, match="--ignore-padding True contradicts"):
        merge_resume_options(new_options({"subset": "s4", "data": "d"}).resolved("av2ts-r50", cpu),
                             {"ignore_padding": True})


def test_resume_may_change_only_the_free_options():
    saved = TrainOptions(subset="s4", data="old", iters=10, lr=1e-3, workers=2)
    merged = merge_resume_options(saved, {"data": "new", "workers": 0, "lr": 1e-3})
    assert (merged.data, merged.workers, merged.lr, merged.iters) == ("new", 0, 1e-3, 10)
    assert set(RESUME_FREE) == {"data", "workers", "device", "iters", "eval_every", "log_every"}
    with pytest.raises(UsageError, match="--lr 0.5 contradicts"):
        merge_resume_options(saved, {"lr": 0.5})


def test_avsegformer_epochs_become_iterations_of_the_batch_and_training_set():
    """The reference counts epochs (S4 30 with the backbone frozen for 5, MS3 60 / 10, AVSS 30 / 0): ``counted``
    turns them into iterations of the run's batch over the training set (rounded up), unless given."""
    cpu = torch.device("cpu")
    s4 = new_options({"subset": "s4", "data": "d"}).resolved("avsegformer-pvt", cpu)
    assert s4.iters is None and (s4.epochs, s4.frozen_epochs, s4.batch) == (30, 5, 2)
    assert (s4.lr, s4.weight_decay, s4.decay_norms, s4.poly_power, s4.clip_norm, s4.backbone_lr_mult) == \
        (2e-5, 0.01, True, 0.0, 0.0, 1.0)
    counted = s4.counted(3452)  # AVSBench S4's training set: 1726 iterations an epoch
    assert (counted.iters, counted.unfreeze_at) == (30 * 1726, 5 * 1726)
    ms3 = new_options({"subset": "ms3", "data": "d"}).resolved("avsegformer-r50", cpu).counted(296)
    assert (ms3.iters, ms3.unfreeze_at) == (60 * 148, 10 * 148)
    avss = new_options({"subset": "avss", "data": "d"}).resolved("avsegformer-r50", cpu).counted(7)
    assert (avss.batch, avss.iters, avss.unfreeze_at) == (4, 53, 0)  # ceil(30 * 7 / 4); never frozen
    given = new_options({"subset": "s4", "data": "d", "iters": 100, "frozen_epochs": 1})
    assert given.resolved("avsegformer-r50", cpu).counted(5).iters == 100  # --iters wins over the epochs
    assert given.resolved("avsegformer-r50", cpu).counted(5).unfreeze_at == 3  # ceil(5 / 2)
    assert new_options({"subset": "s4", "data": "d"}).resolved("av2ts-r50", cpu).counted(5).unfreeze_at == 0
