"""av2ts_cli/training/processes.py: without torchrun a run is one process whose collectives are identities (the
two-process run is in tests/test_training_trainer.py)."""

from __future__ import annotations

import torch

from av2ts_cli.training.processes import Processes


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    processes = Processes.start("cpu")
    assert (processes.rank, processes.world_size, processes.main, processes.distributed) == (0, 1, True, False)
    assert processes.device == torch.device("cpu")
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(processes.sum(values), values) and processes.gather({"a": 1}) == [{"a": 1}]
    processes.barrier()
    processes.stop()
