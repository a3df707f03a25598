"""``log.csv`` (``runs.LOG_FILE``): one row per logged or evaluated iteration (the losses, the LR, the time, the
evaluation). Its curves are drawn by ``plots.write_results``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from av2ts_cli.files import atomic_open
from av2ts_cli.training.optim import LOSS_GROUPS

LOG_COLUMNS = ("iteration", "loss", *LOSS_GROUPS, "lr", "seconds", "val_miou", "val_fscore")


class TrainLog:
    """``log.csv`` of a run. On resume, rows after the checkpoint are dropped (they belong to iterations that will
    run again); the file is rewritten whole (atomically) at the start, then appended to."""

    def __init__(self, path: Path, resume_at: int | None = None):
        self.path = path
        rows = []
        if resume_at is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("iteration", "").isdigit()
                        and int(r["iteration"]) <= resume_at]
        with atomic_open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in LOG_COLUMNS} for r in rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow({k: _cell(row.get(k)) for k in LOG_COLUMNS})


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_log(path: str | os.PathLike) -> list[dict]:
    """``log.csv`` rows with numbers as floats (empty cells as None)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]
