"""av2ts_cli/training/trainer.py (`av2ts train`): a real CPU training run on synthetic S4 data scored by `av2ts eval`,
bit-for-bit resume after SIGKILL and SIGTERM, two-process DDP against one process, a new run never overwrites an
old one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN, av2ts_command, invoke_cli, run_train, train_error, wait_until
from safetensors.torch import load_file

from av2ts_cli.config import get_preset
from av2ts_cli.model import build_model
from av2ts_cli.runs import LOG_FILE, record_owned
from av2ts_cli.training.checkpoint import TRAINER_FILE, read_trainer_state
from av2ts_cli.training.log import read_log
from av2ts_cli.training.recipes import recipe_for

# The CI run: synthetic S4 with two sounding-shape categories at the tiny model's input size (every clip shows both
# shapes, one of them sounds: looking alone gets half of the clips right), 48 validation videos (a small val set makes
# the shuffled-audio control noisy: a derangement pairs same-category clips half of the time), and 300 iterations of
# av2ts-tiny's recipe (training.recipes.RECIPES: lr 1e-3, batch 2, no clipping, no augmentation). Measured on other
# seeds: val mIoU 0.92-0.95 after 100 iterations, 0.97 after 250; shuffled audio 0.57.
SYNTH_OPTIONS = ["--videos", "192", "--val", "48", "--test", "2", "--size", "128", "--categories", "2", "--seed", "0",
                 "--no-maskiges"]
TRAIN_OPTIONS = ["--model", "av2ts-tiny", "--iters", "300", "--eval-every", "0", "--workers", "1", "--seed", "0"]


# ------------------------------------------------------------------------------- a real run: tiny learns the task
@pytest.fixture(scope="session")
def synthetic_s4(tmp_path_factory) -> Path:
    """Synthetic S4 data for the CI training run (SYNTH_OPTIONS), made by `av2ts data synth`."""
    root = tmp_path_factory.mktemp("synthetic-s4")
    invoke_cli(["data", "synth", "--subset", "s4", "--out", str(root), *SYNTH_OPTIONS])
    return root


@pytest.fixture(scope="session")
def trained_tiny(synthetic_s4, tmp_path_factory) -> tuple[Path, dict]:
    """av2ts-tiny trained on ``synthetic_s4`` through `av2ts train` on the CPU: (run folder, the --json report)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = invoke_cli(["train", "--subset", "s4", "--data", str(synthetic_s4), *TRAIN_OPTIONS, "--out", str(run),
                         "--json"])
    return run, json.loads(result.stdout)


def _eval_miou(model: Path, data: Path, *options: str) -> float:
    result = invoke_cli(["eval", "--subset", "s4", "--data", str(data), "--model", str(model), "--split", "val",
                         "--workers", "0", "--batch", "4", "--json", *options])
    return json.loads(result.stdout)["miou"]


@pytest.mark.slow
def test_tiny_learns_sounding_shapes_and_listens(trained_tiny, synthetic_s4):
    """The CI bar: val mIoU >= 0.8 with the clips' own audio, at least 0.3 lower with each clip given another
    clip's audio (the task cannot be solved by looking only)."""
    run, report = trained_tiny
    assert report["run"] == str(run) and report["eval_split"] == "val"
    miou = _eval_miou(run / "best", synthetic_s4)
    shuffled = _eval_miou(run / "best", synthetic_s4, "--shuffle-audio")
    assert miou == pytest.approx(report["best_miou"], abs=1e-3)  # the run's own evaluation is av2ts eval's
    assert miou >= 0.8, (miou, shuffled)
    assert shuffled <= miou - 0.3, (miou, shuffled)


def test_a_run_folder_holds_checkpoints_a_log_and_a_resumable_state(trained_tiny, synthetic_s4):
    run, report = trained_tiny
    doc = json.loads((run / "best" / "config.json").read_text())
    assert doc["preset"] == "av2ts-tiny" and doc["trained_on"]["subset"] == "s4"
    assert doc["meta"]["evaluation"]["miou"] == pytest.approx(report["best_miou"])
    state = read_trainer_state(run / "last" / TRAINER_FILE)  # plain tensors and values: weights_only=True reads it
    assert state["iteration"] == report["iterations"] and state["options"]["model"] == "av2ts-tiny"
    rows = read_log(run / LOG_FILE)
    assert rows[-1]["iteration"] == report["iterations"] and rows[-1]["val_miou"] == pytest.approx(report["best_miou"])
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # it learned
    assert all(rows[i]["lr"] > rows[i + 1]["lr"] for i in range(len(rows) - 1)) and rows[-1]["lr"] == 0.0  # poly


# ------------------------------------------------------------------------------------------ resume and signals
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _start_training(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*av2ts_command(), "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights_bit_for_bit(small_s4, straight_run, tmp_path):
    """6 iterations straight == 3 iterations, SIGKILL right after the checkpoint at 3, resume to 6."""
    run = tmp_path / "killed"
    process = _start_training(["--subset", "s4", "--data", str(small_s4), *SMALL_RUN, "--eval-every", "3",
                               "--out", str(run)])
    wait_until(lambda: (run / "last" / TRAINER_FILE).is_file(), process, "the first checkpoint")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_trainer_state(run / "last" / TRAINER_FILE)["iteration"] == 3
    report = json.loads(run_train(["--resume", str(run), "--json"]).stdout)
    assert report["iterations"] == 6 and report["run"] == str(run)
    _assert_identical(_weights(straight_run), _weights(run))
    straight, resumed = read_log(straight_run / LOG_FILE), read_log(run / LOG_FILE)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint were redone once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]  # the same --iters: the same schedule
    assert resumed[-1]["val_miou"] == straight[-1]["val_miou"]


@pytest.mark.slow
def test_sigterm_saves_last_exits_143_and_resumes_bit_for_bit(small_s4, straight_run, tmp_path):
    """SIGTERM mid-run (no periodic checkpoints at all): last/ is saved at the iteration reached, the exit code is
    143, and resuming from there ends on the straight run's weights."""
    run = tmp_path / "terminated"
    process = _start_training(["--subset", "s4", "--data", str(small_s4), *SMALL_RUN, "--eval-every", "0",
                               "--out", str(run)])
    wait_until(lambda: (run / LOG_FILE).is_file() and len(read_log(run / LOG_FILE)) >= 2, process, "two iterations")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    stopped = read_trainer_state(run / "last" / TRAINER_FILE)["iteration"]
    assert 2 <= stopped < 6
    assert "SIGTERM" in stderr and f"--resume {run}" in " ".join(stderr.split())
    run_train(["--resume", str(run / "last")])
    _assert_identical(_weights(straight_run), _weights(run))


@pytest.mark.slow
def test_resume_with_more_iters_follows_the_new_lr_schedule(small_s4, tmp_path):
    """A finished 3-iteration run (its LR ended at 0) resumed with --iters 6 trains on the poly schedule of 6
    iterations: the step after iteration k runs at base * (1 - k / 6) ** power (the restored schedule used to
    keep the old horizon: LR 0). log.csv's row k holds the LR after step k, that of the next step; the first resumed
    step's LR (k = 3) is read from the resumed trainer before it trains."""
    from av2ts_cli.processes import Processes
    from av2ts_cli.training.trainer import Trainer

    run = tmp_path / "run"
    invoke_cli(["train", "--subset", "s4", "--data", str(small_s4), *SMALL_RUN, "--iters", "3", "--eval-every", "0",
                "--out", str(run), "--json"])
    state = read_trainer_state(run / "last" / TRAINER_FILE)
    bases, power = state["scheduler"]["base_lrs"], state["options"]["poly_power"]
    first = read_log(run / LOG_FILE)
    assert [r["lr"] for r in first] == pytest.approx([bases[0] * (1 - k / 3) ** power for k in (1, 2, 3)], rel=1e-5)
    assert first[-1]["lr"] == 0.0
    weights_at_3 = _weights(run)

    with contextlib.ExitStack() as held:  # held: the run's lock, released when the block ends
        trainer = Trainer({"iters": 6}, run, Processes.start("cpu"), progress=False, held=held)
        expected = [base * (1 - 3 / 6) ** power for base in bases]  # every parameter group
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx(expected, rel=1e-12, abs=0)
        assert trainer.scheduler.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=0)
        assert trainer.start == 3 and trainer.scheduler.last_epoch == 3
        del trainer

    invoke_cli(["train", "--resume", str(run), "--iters", "6", "--json"])
    rows = read_log(run / LOG_FILE)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:3] == first
    assert [r["lr"] for r in rows[3:]] == pytest.approx([bases[0] * (1 - k / 6) ** power for k in (4, 5, 6)],
                                                        rel=1e-5, abs=0)
    state = read_trainer_state(run / "last" / TRAINER_FILE)
    assert state["iteration"] == 6 and state["scheduler"]["lr_lambdas"][0]["iters"] == 6
    moved = [k for k, v in _weights(run).items() if not torch.equal(v, weights_at_3[k])]
    assert moved  # it trained: at LR 0, AdamW (and its weight decay) leaves every weight where it was


# --------------------------------------------------------------------------------------------------------- DDP
@pytest.fixture(scope="session")
def ddp_start(tmp_path_factory) -> Path:
    """av2ts-tiny with frozen BatchNorm and 8192 loss points, as a checkpoint to start from. Trainable BatchNorm
    normalises over each process's share of the batch (SyncBatchNorm needs CUDA) and the criterion draws its
    random points per process: this variant keeps only what DDP must get right (the data split, the gradient
    average, the loss normalisation over processes) and little sampling noise."""
    from av2ts_cli.weights.checkpoint import save_checkpoint

    cfg = get_preset("av2ts-tiny", "s4")
    cfg.frozen_bn = True
    cfg.loss.num_points = 8192
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ddp") / "start")


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two state dicts (floating-point tensors)."""
    return sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(small_s4, ddp_start, tmp_path):
    """torchrun with 2 CPU processes (gloo), 2 clips each, against one process with the same global batch of 4.

    The two runs differ only by the criterion's random points (drawn per process) and by float summation order, so
    they are close but not equal. Measured (8192 points, 4 iterations): the loss differs by 0.1-2 % per iteration
    and the 2-process weights end 0.2 x the size of the update away from the 1-process ones. The control, one
    process on other clips (another --seed: another data order), lands 0.9 x the update away with the loss 1-9 %
    off; the bounds sit between the two."""
    common = ["--subset", "s4", "--data", str(small_s4), "--model", str(ddp_start), "--iters", "4", "--batch", "4",
              "--lr", "1e-3", "--workers", "0", "--log-every", "1", "--eval-every", "0"]
    run_train([*common, "--seed", "1", "--out", str(tmp_path / "one")])
    run_train([*common, "--seed", "2", "--out", str(tmp_path / "other")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "av2ts_cli", "train", *common, "--seed", "1", "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_log(tmp_path / "one" / LOG_FILE), read_log(tmp_path / "two" / LOG_FILE)
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.03), (one, two)
    assert [r["lr"] for r in one] == [r["lr"] for r in two]

    start = load_file(str(ddp_start / "model.safetensors"))
    w_one, w_two, w_other = (_weights(tmp_path / name) for name in ("one", "two", "other"))
    update = _distance(w_one, start)
    assert _distance(w_two, w_one) < 0.4 * update < _distance(w_other, w_one)
    assert _distance(w_other, w_one) > 0.6 * update  # the control really is another batch


# ------------------------------------------------------------------------------------------------ failure paths
def test_a_new_run_never_overwrites_an_old_one(straight_run, small_s4):
    train_error(["--subset", "s4", "--data", str(small_s4), "--model", "av2ts-tiny", "--out", str(straight_run)],
                2, str(straight_run), "--resume")


# ------------------------------------------------------------------------------------- locks and failed starts
def test_a_run_in_use_is_refused_with_the_holders_pid(small_s4, tmp_path):
    from av2ts_cli import locks

    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "last" / TRAINER_FILE).write_bytes(b"not read: the lock comes first")
    with locks.held(run):  # as another `av2ts train` would hold it (flock: a second open file conflicts)
        line = train_error(["--resume", str(run)], 1)
        assert line == f"error: {run}: in use by av2ts pid {os.getpid()}"
        fresh = tmp_path / "fresh"
        with locks.held(fresh):
            line = train_error(["--subset", "s4", "--data", str(small_s4), *SMALL_RUN, "--out", str(fresh)], 1)
            assert line == f"error: {fresh}: in use by av2ts pid {os.getpid()}"
    assert sorted(p.name for p in run.iterdir()) == ["last"]


def test_a_start_that_fails_before_its_first_checkpoint_leaves_a_folder_the_command_reuses(small_s4, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_s4, broken)
    frames = [p for p in broken.rglob("*.png") if "visual_frames" in p.parts and "train" in p.parts]
    for frame in frames:
        frame.write_bytes(frame.read_bytes()[:40])  # every training frame truncated: the first batch fails
    run = tmp_path / "run"
    args = ["--subset", "s4", *SMALL_RUN, "--iters", "1", "--eval-every", "0", "--out", str(run)]
    line = train_error(["--data", str(broken), *args, "--json"], 1)  # --json: no progress bar
    assert line.startswith(f"error: {broken}") and ": unreadable frame" in line
    assert not run.exists()  # it made the folder; with no checkpoint in it, the folder is gone
    run.mkdir()
    (run / LOG_FILE).write_text("iteration,loss\n")  # a log.csv that no record says av2ts wrote: someone else's
    line = train_error(["--data", str(small_s4), *args], 2)
    assert line == f"error: {run}: a folder av2ts did not make (it holds {LOG_FILE}); choose another --out"
    assert (run / LOG_FILE).read_text() == "iteration,loss\n"
    record_owned(run, [LOG_FILE])  # what a start killed before its first checkpoint leaves: its log, recorded
    invoke_cli(["train", "--data", str(small_s4), *args])
    assert (run / "last" / TRAINER_FILE).is_file() and read_log(run / LOG_FILE)[-1]["iteration"] == 1


def test_a_folder_holding_only_best_is_never_trained_into(small_s4, straight_run, tmp_path):
    """Deleting last/ to save space is common: the best/ left is a trained model, never replaced by a new run."""
    import shutil

    run = tmp_path / "pruned"
    shutil.copytree(straight_run / "best", run / "best")
    before = (run / "best" / "model.safetensors").read_bytes()
    train_error(["--subset", "s4", "--data", str(small_s4), *SMALL_RUN, "--out", str(run)], 2, str(run), "--resume")
    assert (run / "best" / "model.safetensors").read_bytes() == before


# ------------------------------------------------------------------------ AVSegFormer: the frozen first epochs
@pytest.fixture(scope="session")
def avsegformer_start(tmp_path_factory) -> Path:
    """avsegformer-tiny at 64 px (a quarter of its 128 px step), as a checkpoint to start from: its recipe, loss and
    freezing are the preset's, only the frames are smaller."""
    import dataclasses

    from av2ts_cli.weights.checkpoint import save_checkpoint

    cfg = dataclasses.replace(get_preset("avsegformer-tiny", "s4"), input_size=64)
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("avsegformer") / "start")


def _avsegformer_run(small_s4: Path, start: Path, run: Path, **options) -> dict:
    from av2ts_cli.training import train

    return train(progress=False, subset="s4", data=small_s4, model=str(start), workers=0, seed=1, eval_every=0,
                 log_every=1, out=str(run), **options)


def test_the_avsegformer_backbone_trains_from_the_iteration_its_frozen_epochs_end(small_s4, avsegformer_start,
                                                                                  tmp_path):
    """One frozen epoch of small_s4 (6 clips, batch 2) is 3 iterations: steps 1-3 leave the backbone's weights and
    AdamW state alone, step 4 trains it; the optimizer holds its parameters from the start (one group: the
    reference's AdamW over model.parameters()), and the run records the iteration."""
    from av2ts_cli.processes import Processes
    from av2ts_cli.training.trainer import Trainer

    given = {"subset": "s4", "data": str(small_s4), "model": str(avsegformer_start), "iters": 4, "frozen_epochs": 1,
             "workers": 0, "eval_every": 0, "seed": 1, "out": str(tmp_path / "run")}
    with contextlib.ExitStack() as held:
        trainer = Trainer(given, None, Processes.start("cpu"), progress=False, held=held)
        model = trainer.model
        assert trainer.options.unfreeze_at == 3 and trainer.options.poly_power == 0.0
        backbone = list(model.backbone.parameters())
        assert not any(p.requires_grad for p in backbone)
        assert all(p.requires_grad for p in [*model.head.parameters(), *model.audio_proj.parameters()])
        assert not any(p.requires_grad for p in model.audio_encoder.parameters())
        groups = trainer.optimizer.param_groups
        tiny_lr = recipe_for("avsegformer-tiny", "s4").lr
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(tiny_lr, 0.01)]
        held_ids = {id(p) for p in groups[0]["params"]}
        assert {id(p) for p in backbone} <= held_ids
        assert not held_ids & {id(p) for p in model.audio_encoder.parameters()}

        initial = [p.detach().clone() for p in backbone]
        seen = []
        step = trainer._run_step

        def watched(batch):
            seen.append(all(p.requires_grad for p in backbone))
            result = step(batch)
            unchanged = all(torch.equal(p, q) for p, q in zip(backbone, initial, strict=True))
            stateless = not any(p in trainer.optimizer.state for p in backbone)
            seen[-1] = (seen[-1], unchanged, stateless)
            return result

        trainer._run_step = watched
        report = trainer.fit()
    assert seen == [(False, True, True)] * 3 + [(True, False, False)]
    assert report["backbone_unfrozen_at"] == 3
    doc = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert doc["meta"]["training"]["backbone_unfrozen_at"] == 3
    assert read_trainer_state(tmp_path / "run" / "last" / TRAINER_FILE)["options"]["unfreeze_at"] == 3
    with contextlib.ExitStack() as held:  # resumed past the unfreezing: the backbone trains from the first step
        resumed = Trainer({"iters": 5}, tmp_path / "run", Processes.start("cpu"), progress=False, held=held)
        assert resumed.start == 4 and resumed.options.unfreeze_at == 3
        assert all(p.requires_grad for p in resumed.model.backbone.parameters())
        del resumed


def test_an_avsegformer_run_resumed_across_the_unfreezing_is_bit_for_bit(small_s4, avsegformer_start,
                                                                                 tmp_path):
    """3 iterations straight (the backbone unfreezes at 2) == 1, then resumed to 3 (restored frozen, unfrozen on
    the way); the constant LR does not depend on --iters."""
    straight = tmp_path / "straight"
    _avsegformer_run(small_s4, avsegformer_start, straight, iters=3, unfreeze_at=2)
    split = tmp_path / "split"
    _avsegformer_run(small_s4, avsegformer_start, split, iters=1, unfreeze_at=2)
    from av2ts_cli.training import train

    report = train(resume=str(split), progress=False, iters=3, workers=0)
    assert report["iterations"] == 3 and report["backbone_unfrozen_at"] == 2
    _assert_identical(_weights(straight), _weights(split))
    rows, straight_rows = read_log(split / LOG_FILE), read_log(straight / LOG_FILE)
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    assert {r["lr"] for r in rows} == {recipe_for("avsegformer-tiny", "s4").lr}
