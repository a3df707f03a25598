"""av2ts_cli/processes.py: without torchrun a run is one process whose collectives are identities; the torchrun
environment checked; shards; the CPU's precision measured (for real), chosen from injected figures, cached and
reused (the two-process runs are in tests/test_training_trainer.py, tests/test_predict.py,
tests/test_evaluate.py and tests/test_maskiges_dataset.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from av2ts_cli import processes as processes_module
from av2ts_cli.errors import UsageError
from av2ts_cli.model import inference
from av2ts_cli.processes import (
    Processes,
    cpu_precision,
    device_for,
    environment,
    machine_key,
    resolve_device,
    resolve_precision,
)


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


def _figures(speedup: float) -> dict:
    return {"matmul_gflops": {"fp32": 100.0, "bf16": 100.0 * speedup},
            "conv_gflops": {"fp32": 50.0, "bf16": 50.0 * speedup}, "bf16_speedup": speedup, "seconds": 0.1,
            "version": inference.MEASURE_VERSION}


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """An empty av2ts cache and a measurement that returns the figures set in ``calls["speedup"]`` and counts its
    calls."""
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))
    calls = {"count": 0, "speedup": 1.0}

    def fake(budget_s: float = 0.05) -> dict:
        calls["count"] += 1
        return _figures(calls["speedup"])

    monkeypatch.setattr(inference, "measure_precisions", fake)
    return calls


def test_the_measurement_is_real_and_short():
    figures = inference.measure_precisions()
    for key in ("matmul_gflops", "conv_gflops"):
        assert set(figures[key]) == {"fp32", "bf16"} and all(v > 0 for v in figures[key].values())
    assert figures["bf16_speedup"] > 0 and figures["version"] == inference.MEASURE_VERSION
    assert figures["seconds"] < 5  # about 0.3 s on a quiet machine; a busy shared one stretches it
    assert inference.precision_from_figures(figures) in ("fp32", "bf16")


@pytest.mark.parametrize(("speedup", "expected"), [(1.8, "bf16"), (0.6, "fp32"), (1.05, "fp32")])
def test_auto_is_the_faster_precision_as_measured(measured, speedup, expected, capsys):
    measured["speedup"] = speedup
    cpu = torch.device("cpu")
    chosen, basis = resolve_precision(None, cpu)
    assert chosen == expected and basis["asked"] == "auto"
    assert basis["measured"]["figures"]["bf16_speedup"] == speedup and basis["measured"]["precision"] == expected
    assert resolve_precision("fp32", cpu) == ("fp32", {"asked": "--precision fp32", "measured": None})  # forced
    capsys.readouterr()
    assert resolve_precision(None, cpu, half=True)[0] == expected  # --half: bf16 only where it is faster
    assert ("measured no faster than fp32" in capsys.readouterr().err) is (expected == "fp32")
    assert resolve_precision("bf16", cpu)[0] == "bf16"  # forced, with a warning where it is slower
    assert ("expect it slower" in capsys.readouterr().err) is (expected == "fp32")
    assert measured["count"] == 1  # every later choice reused the first measurement


def test_the_measurement_is_cached_per_machine_torch_and_threads(measured, monkeypatch):
    measured["speedup"] = 1.5
    first = cpu_precision()
    assert (first["precision"], first["cached"], measured["count"]) == ("bf16", False, 1)
    cache = json.loads(Path(first["cache"]).read_text())
    assert list(cache) == [machine_key()] and cache[machine_key()]["figures"]["bf16_speedup"] == 1.5
    measured["speedup"] = 0.5  # the machine would now measure otherwise: the cached figures are reused
    second = cpu_precision()
    assert (second["precision"], second["cached"], measured["count"]) == ("bf16", True, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another measurement, kept beside the first
        third = cpu_precision()
    finally:
        torch.set_num_threads(threads)
    assert (third["precision"], third["cached"], measured["count"]) == ("fp32", False, 2)
    assert len(json.loads(Path(first["cache"]).read_text())) == 2
    Path(first["cache"]).write_text("{not json")  # a broken cache is measured anew
    assert cpu_precision()["cached"] is False and measured["count"] == 3
    monkeypatch.setattr(processes_module, "cpu_model", lambda: "another CPU")
    assert "another CPU" in machine_key() and cpu_precision()["cached"] is False


def test_the_precision_choice_is_a_usage_error_or_a_warning(measured, capsys):
    cpu = torch.device("cpu")
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="contradicts --precision fp32"):
        resolve_precision("fp32", cpu, half=True)
    assert measured["count"] == 0  # no measurement where the choice does not depend on it
