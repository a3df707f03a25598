"""What ``train``, ``eval`` and ``predict`` share about their outputs and where they run: numbered run folders
(``runs/<command>/exp``, ``exp2``, ...), JSON written atomically, and the ``--device`` choice."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import torch

from av2ts_cli.errors import UsageError


def numbered_run_folder(base: str | os.PathLike, name: str = "exp") -> Path:
    """A new folder ``base/name``, ``base/name2``, ... (the first that does not exist), created."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    index = 1
    while True:
        folder = base / (name if index == 1 else f"{name}{index}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            index += 1


def write_json(path: Path, obj) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        temp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"unknown device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available")
    return resolved
