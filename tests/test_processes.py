"""av2ts_cli/processes.py: without torchrun a run is one process whose collectives are identities; the torchrun
environment checked; shards (the two-process runs are in tests/test_training_trainer.py, tests/test_predict.py,
tests/test_evaluate.py and tests/test_maskiges_dataset.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from av2ts_cli.errors import UsageError
from av2ts_cli.model import inference
from av2ts_cli.processes import Processes, device_for, environment, resolve_device, resolve_precision


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    processes = Processes.start("cpu")
    assert (processes.rank, processes.world_size, processes.main, processes.distributed) == (0, 1, True, False)
    assert processes.device == torch.device("cpu")
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(processes.sum(values), values) and processes.gather({"a": 1}) == [{"a": 1}]
    processes.barrier()
    processes.stop()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # one process: its signals are left alone


def test_a_rank_that_left_the_group_finishes_through_a_sigterm():
    """torchrun SIGTERMs the others as soon as one rank exits non-zero: a rank whose work is combined (it has
    left the group) goes on printing and exits with its own code, not -15."""
    code = ("import os, signal, sys; from av2ts_cli.processes import Processes; "
            "Processes(rank=0, world_size=2).stop(); os.kill(os.getpid(), signal.SIGTERM); "
            "print('report printed'); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "report printed\n"), done.stderr


@pytest.mark.parametrize(("env", "message"), [({"RANK": "x", "WORLD_SIZE": "2"}, "must be integers"),
                                              ({"RANK": "2", "WORLD_SIZE": "2"}, "not in 0..WORLD_SIZE-1"),
                                              ({"RANK": "0", "WORLD_SIZE": "0"}, "not in 0..WORLD_SIZE-1")])
def test_a_bad_torchrun_environment_is_one_usage_line(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=message):
        environment()


def test_the_environment_and_the_device_of_a_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert environment() == (3, 4, 3)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert environment() == (3, 4, 1)
    assert device_for("cpu", 1, 4) == "cpu" and device_for("cuda:0", 1, 4) == "cuda:0"
    if not torch.cuda.is_available():
        assert device_for("auto", 1, 4) == "auto"  # resolved to the CPU later


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [Processes(rank=r, world_size=3).shard(items) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items
    assert Processes().shard(items) == items and Processes().broadcast("x") == "x"


# ------------------------------------------------------------------------------------ device and precision
def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError) as caught:
        resolve_device("tpu")
    assert caught.value.message == "--device tpu: not a device av2ts runs on; choose auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("native", [True, False])
def test_the_precision_choice_is_a_usage_error_or_a_warning(monkeypatch, capsys, native):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == ("bf16" if native else "fp32")
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="contradicts --precision fp32"):
        resolve_precision("fp32", cpu, half=True)
    capsys.readouterr()
    assert resolve_precision(None, cpu, half=True) == ("bf16" if native else "fp32")
    assert ("no native bf16" in capsys.readouterr().err) is not native  # the changed choice is said once
