"""av2ts_cli/training/log.py: log.csv rows, and on resume the rows after the checkpoint dropped."""

from __future__ import annotations

from av2ts_cli.training.log import LOG_COLUMNS, TrainLog, read_log


def test_a_resumed_log_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "log.csv"
    log = TrainLog(path)
    for iteration in range(1, 6):
        log.write({"iteration": iteration, "loss": 1.0 / iteration, "lr": 0.1, "seconds": 0.5,
                   "val_miou": 0.25 if iteration == 3 else None})
    rows = read_log(path)
    assert list(rows[0]) == list(LOG_COLUMNS) and [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["val_miou"] == 0.25 and rows[1]["val_miou"] is None and rows[2]["loss"] == float(f"{1 / 3:.6g}")

    TrainLog(path, resume_at=3)  # iterations 4 and 5 will run again
    assert read_log(path) == rows[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]  # rewritten through a temp, none left
    TrainLog(path)  # a new run starts an empty log
    assert read_log(path) == [] and path.read_text().splitlines() == [",".join(LOG_COLUMNS)]
