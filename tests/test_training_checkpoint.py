"""av2ts_cli/training/checkpoint.py: ``last/`` is replaced as a unit (a kill leaves a complete folder to resume),
trainer.pt is read with weights_only and checked, and a missing or corrupt run is a one-line error."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import train_error

from av2ts_cli.config import get_preset
from av2ts_cli.errors import CheckpointError
from av2ts_cli.model import build_model
from av2ts_cli.training.checkpoint import (
    LAST,
    TRAINER_FILE,
    TRAINER_FORMAT,
    find_resume_checkpoint,
    read_trainer_state,
    write_training_checkpoint,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "s4")
    return build_model(cfg), cfg


def test_last_is_replaced_whole_and_a_kill_mid_swap_still_resumes(tmp_path, tiny):
    model, cfg = tiny
    run = tmp_path / "run"
    run.mkdir()
    write_training_checkpoint(run / LAST, model, cfg, {}, {"iteration": 1, "rng": [torch.get_rng_state()]})
    write_training_checkpoint(run / LAST, model, cfg, {}, {"iteration": 2})
    state = read_trainer_state(run / LAST / TRAINER_FILE)
    assert state["format"] == TRAINER_FORMAT and state["iteration"] == 2 and "rng" not in state  # all of it new
    assert sorted(p.name for p in run.iterdir()) == [LAST]  # no temp or old folder left
    assert sorted(p.name for p in (run / LAST).iterdir()) == ["config.json", "model.safetensors", TRAINER_FILE]

    # A SIGKILL between the two renames of the swap: no last/, the old one and the complete new one beside it.
    os.replace(run / LAST, run / f".{LAST}.0a1b2c3d.old")
    write_training_checkpoint(tmp_path / "newer", model, cfg, {}, {"iteration": 3})
    os.replace(tmp_path / "newer", run / f".{LAST}.4e5f6a7b.partial")
    found = find_resume_checkpoint(run)
    assert found.name == f".{LAST}.4e5f6a7b.partial" and found.parent == run
    assert read_trainer_state(found / TRAINER_FILE)["iteration"] == 3
    (run / f".{LAST}.9c8d7e6f.partial").mkdir()  # a temp the kill cut short: no trainer.pt yet, never taken
    assert find_resume_checkpoint(run) == found
    write_training_checkpoint(run / LAST, model, cfg, {}, {"iteration": 4})  # the next save clears the leftovers
    assert sorted(p.name for p in run.iterdir()) == [LAST]
    assert find_resume_checkpoint(run) == run / LAST


def test_a_file_that_is_not_a_trainer_state_is_refused(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / TRAINER_FILE)
    with pytest.raises(CheckpointError, match="not an av2ts trainer state"):
        read_trainer_state(tmp_path / TRAINER_FILE)
    torch.save({"format": TRAINER_FORMAT, "version": 99}, tmp_path / TRAINER_FILE)
    with pytest.raises(CheckpointError, match="newer av2ts"):
        read_trainer_state(tmp_path / TRAINER_FILE)


def test_resume_from_a_missing_or_corrupt_run_is_a_one_line_error(tmp_path, straight_run):
    train_error(["--resume", str(tmp_path / "gone")], 1, str(tmp_path / "gone"), "no such run")
    train_error(["--resume", str(straight_run / "best")], 1, str(straight_run / "best"), TRAINER_FILE)
    corrupt = tmp_path / "corrupt"
    (corrupt / "last").mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (corrupt / "last" / name).write_bytes((straight_run / "last" / name).read_bytes())
    (corrupt / "last" / TRAINER_FILE).write_bytes((straight_run / "last" / TRAINER_FILE).read_bytes()[:5000])
    train_error(["--resume", str(corrupt)], 1, str(corrupt / "last" / TRAINER_FILE), "unreadable trainer state")
    (corrupt / "last" / TRAINER_FILE).write_bytes((straight_run / "last" / TRAINER_FILE).read_bytes())
    (corrupt / "last" / "model.safetensors").write_bytes(b"not safetensors")
    train_error(["--resume", str(corrupt)], 1, str(corrupt / "last" / "model.safetensors"))
    train_error(["--resume", str(straight_run), "--lr", "0.5"], 2, "--lr 0.5 contradicts")
    train_error(["--resume", str(straight_run)], 2, "already at iteration 6")
