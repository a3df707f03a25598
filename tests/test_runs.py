"""runs.py: numbered run folders, the folder names inputs get (contained in the run folder whatever the name), what
av2ts may touch in a folder (its record of what it wrote); and the atomic JSON (files.write_json) the runs write."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from av2ts_cli.errors import UsageError
from av2ts_cli.files import temp_name_for, write_json
from av2ts_cli.runs import (
    NAME_LIMIT_BYTES,
    claim_folder,
    folder_names,
    numbered_run_folder,
    owned_files,
    record_owned,
    remove_owned,
    safe_folder_name,
)


def test_run_folders_are_numbered_and_never_reused(tmp_path):
    assert [numbered_run_folder(tmp_path / "runs").name for _ in range(3)] == ["exp", "exp2", "exp3"]
    (tmp_path / "runs" / "exp2").rmdir()
    assert numbered_run_folder(tmp_path / "runs").name == "exp2"  # the first free name
    assert numbered_run_folder(tmp_path / "runs", "eval").name == "eval"


def test_write_json_replaces_whole_files_only(tmp_path):
    path = write_json(tmp_path / "deep" / "summary.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # fails while writing: the old file stays, no temp file is left
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["summary.json"]


# ------------------------------------------------------------------------------------------------ containment
_PIECES = ["", ".", "..", "/", "\\", "\n", "\r", "\x00", "\x1b[31m", "\t", " ", "a", "clip", "..\u00e9",
           "\u00e9", "\u6f22\u5b57", "\U0001f3b5", "-", "_", "~", "*", "?", "\udcff"]


def _random_stem(rng: random.Random) -> str:
    """A stem built from the pieces that break naive path joins: dots, separators, control characters, wide
    characters, and lengths up to 1,000 bytes (a long piece repeated)."""
    stem = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 8)))
    if rng.random() < 0.2:
        stem += rng.choice(["x", "\u00e9", "\u6f22"]) * rng.randint(100, 300)
    return stem


def test_any_input_name_gives_a_folder_inside_the_run_folder(tmp_path):
    """The containment property, over 2,000 generated names (seeded): the folder name is one path component, not
    hidden, not "." or "..", free of control characters and separators, short enough for the file system with
    av2ts's temp suffixes, and the folder (and a temp beside it) can be made inside the run folder."""
    rng = random.Random(20261207)
    run = tmp_path / "run"
    run.mkdir()
    for _ in range(2000):
        stem = _random_stem(rng)
        name = safe_folder_name(stem)
        assert name and name not in (".", "..") and not name.startswith(".")
        assert not any(ch in name for ch in "/\\\x00") and all(ord(ch) >= 0x20 and ord(ch) != 0x7F for ch in name)
        assert len(name.encode("utf-8", "surrogateescape")) <= NAME_LIMIT_BYTES
        folder = run / name
        assert folder.resolve().parent == run.resolve()
        assert len(temp_name_for(folder).name.encode("utf-8", "surrogateescape")) <= 255
    # and through folder_names, whole paths with such stems: each folder is made, inside the run folder
    videos = [tmp_path / "in" / (_random_stem(rng).replace("/", "_").replace("\x00", "_") + ".mp4")
              for _ in range(200)]
    names = folder_names(videos, run)
    assert len(set(names)) == len(names)
    for name in names:
        (run / name).mkdir(exist_ok=True)
        assert (run / name).resolve().parent == run.resolve()
    assert sorted(os.listdir(run)) == sorted(set(names))


def test_dot_names_and_separators_are_renamed_not_followed(tmp_path):
    run = tmp_path / "out"
    run.mkdir()
    names = folder_names([Path("/videos/..mp4"), Path("/videos/.mp4"), Path("/videos/..hidden.mp4"),
                          Path("/videos/a\nb.mp4")], run)
    assert names == ["_", "_mp4", "_.hidden", "a_b"]
    long = "\u00e9" * 300
    cut = safe_folder_name(long)
    assert len(cut.encode()) <= NAME_LIMIT_BYTES and cut != safe_folder_name("\u00e9" * 301)


# ------------------------------------------------------------------------------------------------ ownership
def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_av2ts_did_not_make_is_refused_and_left_as_it_was(tmp_path):
    folder = tmp_path / "clip"
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "000000.png").write_bytes(b"the user's picture")
    (folder / "notes.txt").write_text("mine")
    before = _listing(folder)
    with pytest.raises(UsageError) as caught:
        claim_folder(folder)
    assert caught.value.message == (f"{folder}: a folder av2ts did not make (it holds masks, notes.txt); pass "
                                    "--force to write into it (av2ts replaces only the files it writes)")
    assert _listing(folder) == before
    assert claim_folder(folder, force=True) == []  # allowed in, and still owns nothing there
    assert remove_owned(folder) == [] and _listing(folder) == before


def test_only_what_av2ts_recorded_is_removed(tmp_path):
    folder = tmp_path / "clip"
    assert claim_folder(folder) == [] and owned_files(folder) == []  # made here: ours
    record_owned(folder, ["summary.json", "masks/000000.png"])
    (folder / "masks").mkdir()
    (folder / "masks" / "000000.png").write_bytes(b"ours")
    (folder / "masks" / "000001.png").write_bytes(b"the user's")  # never recorded
    (folder / "summary.json").write_text("{}")
    assert claim_folder(folder) == ["summary.json", "masks/000000.png"]
    assert sorted(remove_owned(folder)) == ["masks/000000.png", "summary.json"]
    assert _listing(folder) == {"masks/000001.png": b"the user's"}  # the emptied record went too
    assert owned_files(folder) is None


def test_a_folder_an_older_av2ts_made_is_still_its_own(tmp_path):
    folder = tmp_path / "clip"
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "000000.png").write_bytes(b"x")
    (folder / "frames.jsonl").write_text("")
    (folder / "summary.json").write_text(json.dumps({"av2ts_version": "0.9", "files": ["frames.jsonl"]}))
    assert sorted(claim_folder(folder)) == ["frames.jsonl", "masks/000000.png", "summary.json"]
