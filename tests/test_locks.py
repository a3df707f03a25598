"""av2ts_cli/locks.py: folder locks across processes (the holder's pid in the message, released by the kernel on
SIGKILL, no lock file left after a release) and the sweep of the temps ``files`` names."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from av2ts_cli import files, locks

HOLD = """
import sys
from av2ts_cli import locks
lock = locks.acquire(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
lock.release(remove_empty_folder=True)
"""


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin closes."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_folder_held_by_another_process_is_busy_with_its_pid(tmp_path):
    folder = tmp_path / "out" / "clip"
    process = _holder(folder)
    try:
        with pytest.raises(locks.Busy) as caught:
            locks.acquire(folder, label="clip.mp4")
        assert str(caught.value) == f"clip.mp4: in use by av2ts pid {process.pid}"
        assert caught.value.pid == process.pid
        again = pickle.loads(pickle.dumps(caught.value))  # crosses processes intact (errors' rule)
        assert type(again) is locks.Busy and again.message == caught.value.message and again.pid == process.pid
    finally:
        process.stdin.close()
        process.wait(timeout=30)
    assert not folder.exists()  # released: the lock file and the folder it made are gone
    with locks.held(folder, remove_empty_folder=True) as lock:
        assert lock.created and (folder / locks.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not folder.exists()


def test_sigkill_releases_the_lock(tmp_path):
    process = _holder(tmp_path / "run")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (tmp_path / "run" / locks.LOCK_FILE).exists()  # the file stays, the lock does not
    with locks.held(tmp_path / "run") as lock:
        assert lock.held and not lock.created
    assert not (tmp_path / "run" / locks.LOCK_FILE).exists() and (tmp_path / "run").is_dir()


def test_waiting_takes_the_lock_when_the_holder_lets_go(tmp_path):
    process = _holder(tmp_path / "run")
    process.stdin.close()  # lets go (and removes the folder) while we wait
    with locks.held(tmp_path / "run", wait=30) as lock:
        assert lock.held and (tmp_path / "run" / locks.LOCK_FILE).is_file()
    process.wait(timeout=30)


def test_the_sweep_removes_every_temp_files_names_and_nothing_else(tmp_path):
    keep = [tmp_path / "summary.json", tmp_path / "masks" / "000001.png", tmp_path / ".hidden",
            tmp_path / "a.partial.txt", tmp_path / ".x.nothex12.partial.png"]
    temps = [files.temp_name_for(tmp_path / "frames.jsonl"), files.temp_name_for(tmp_path / "masks" / "000002.png"),
             files.temp_name_for(files.temp_name_for(tmp_path / "overlay.mp4"))]  # encode_video's silent temp's
    for path in keep + temps:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    folder_temps = [tmp_path / ".last.89abcdef.partial", tmp_path / ".last.0123abcd.old"]  # atomic_folder's
    for folder in folder_temps:
        folder.mkdir()
        (folder / "trainer.pt").write_text("x")
    assert set(locks.sweep_temps(tmp_path, folders=False)) == set(temps)  # train: its swap folders stay
    assert all(folder.is_dir() for folder in folder_temps)
    assert set(locks.sweep_temps(tmp_path)) == set(folder_temps)
    assert all(p.exists() for p in keep)
    assert not [p for p in tmp_path.rglob("*") if locks.is_temp(p.name)]


def test_the_sweep_of_a_shared_folder_takes_only_one_stem(tmp_path):
    mine, theirs = files.temp_name_for(tmp_path / "a.mp4"), files.temp_name_for(tmp_path / "b.mp4")
    for path in (mine, theirs):
        path.write_text("x")
    assert locks.sweep_temps(tmp_path, recursive=False, stem="a") == [mine]
    assert theirs.exists()
