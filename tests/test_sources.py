"""av2ts_cli/sources.py: the videos a command's sources name; a subfolder that cannot be listed is an error."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.errors import DataError
from av2ts_cli.sources import collect_videos


def _tree(root):
    for folder, name in (("a", "x.mp4"), ("b", "y.mp4"), ("b/c", "z.mp4")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(b"\0")
    (root / "top.mp4").write_bytes(b"\0")


def _unlistable(monkeypatch, folder):
    """Listing ``folder`` fails with EACCES, as for a chmod 0 folder of another user (as root, chmod does not
    stop listing, so the failure is made where every walk lists a folder: os.scandir)."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_recursive_finds_every_video_in_order(tmp_path):
    _tree(tmp_path)
    assert collect_videos([tmp_path], recursive=True) == [tmp_path / "a" / "x.mp4", tmp_path / "b" / "c" / "z.mp4",
                                                          tmp_path / "b" / "y.mp4", tmp_path / "top.mp4"]


def test_an_unlistable_subfolder_is_an_error_naming_it(tmp_path, monkeypatch):
    _tree(tmp_path)
    _unlistable(monkeypatch, tmp_path / "b")
    with pytest.raises(DataError) as caught:
        collect_videos([tmp_path], recursive=True)
    assert str(caught.value) == f"{tmp_path / 'b'}: cannot list this folder under --recursive: permission denied"


def test_cli_predict_reports_the_unlistable_subfolder_in_one_line(tmp_path, monkeypatch):
    _tree(tmp_path)
    _unlistable(monkeypatch, tmp_path / "b" / "c")
    result = CliRunner().invoke(cli.app, ["predict", str(tmp_path), "-r", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'b' / 'c'}: cannot list this folder under --recursive: permission denied"]
    assert not (tmp_path / "out").exists()
