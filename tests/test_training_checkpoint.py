"""av2ts_cli/training/checkpoint.py: ``last/`` is replaced as a unit (a kill leaves a complete folder to resume),
trainer.pt is read with weights_only and checked, and a missing or corrupt run is a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import train_error

from av2ts_cli.config import get_preset
from av2ts_cli.errors import CheckpointError, DataError
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


# ------------------------------------------------------------------------------------- maskiges a model saw
def _s4_with_maskiges_from_masks(tmp_path):
    """A synthetic S4 set whose maskiges av2ts made from --masks-from files (so pre_SAM_mask.json records them)."""
    import numpy as np

    from av2ts_cli.data.layout import SPLITS, list_videos, resolve_root
    from av2ts_cli.data.synth import SynthOptions, synthesize
    from av2ts_cli.maskiges.dataset import pregenerate

    root = tmp_path / "AVS_dataset"
    synthesize(root, SynthOptions("s4", counts={"train": 2, "val": 1, "test": 1}, seed=4, size=64, maskiges=False))
    masks = tmp_path / "masks"
    for split in SPLITS:
        for video in list_videos(resolve_root(root, "s4"), "s4", split):
            for frame in video.frames:
                path = masks / split / video.group / video.name / f"{frame.stem}_mask.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                square = np.zeros((1, 64, 64), bool)
                square[0, 8:40, 16:48] = True
                np.save(path, square)
    assert not pregenerate("s4", root, masks_from=masks, progress=False)["failures"]
    return root, masks


def test_maskige_provenance_reads_the_record_beside_pre_sam_mask(tmp_path):
    from av2ts_cli.training.checkpoint import maskige_provenance

    root, masks = _s4_with_maskiges_from_masks(tmp_path)
    found = maskige_provenance("s4", root)
    assert found["source"] == "masks-from" and found["masks_from"] == str(masks.resolve())
    assert found["folder"].endswith("pre_SAM_mask") and found["record"].endswith("pre_SAM_mask.json")
    assert "COMBO mask_precess" in found["renderer"]
    record = Path(found["record"])
    record.unlink()
    assert maskige_provenance("s4", root)["source"] == "unknown"  # COMBO's published maskiges have no record
    record.write_text("{broken")
    with pytest.raises(DataError, match="unreadable provenance record"):
        maskige_provenance("s4", root)


@pytest.mark.slow
def test_a_siam_run_records_its_maskiges_in_config_json(tmp_path):
    """`av2ts train` of a Siam model writes trained_on.maskiges (what pre_SAM_mask.json says) into config.json; a
    model without the Siam encoder records none."""
    import json

    from conftest import run_train

    from av2ts_cli.training.checkpoint import maskige_provenance
    from av2ts_cli.weights.checkpoint import save_checkpoint

    root, _ = _s4_with_maskiges_from_masks(tmp_path)
    model = tmp_path / "siam-tiny"
    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "s4", siam=True)
    save_checkpoint(build_model(cfg), cfg, model)
    run = tmp_path / "run"
    run_train(["--subset", "s4", "--data", str(root), "--model", str(model), "--iters", "1", "--batch", "1",
               "--workers", "0", "--eval-every", "0", "--out", str(run)])
    doc = json.loads((run / LAST / "config.json").read_text())
    assert doc["model"]["siam"] and doc["trained_on"]["maskiges"] == maskige_provenance("s4", root)
    assert doc["trained_on"]["maskiges"]["source"] == "masks-from"
