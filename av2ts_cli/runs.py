"""What ``train``, ``eval`` and ``predict`` share about their outputs and where they run: numbered run folders
(``runs/<command>/exp``, ``exp2``, ...), the ``--device`` choice and the ``--precision`` choice. (JSON is written
atomically by ``files.write_json``.)"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from av2ts_cli.console import warn
from av2ts_cli.errors import UsageError
from av2ts_cli.model.inference import choose_precision


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


def resolve_precision(precision: str | None, device: torch.device, half: bool = False) -> str:
    """The precision ``eval`` and ``predict`` run at for ``--precision`` (None: the device's default) and ``--half``
    (``model.inference.choose_precision``): a choice the device cannot run is a UsageError, and the note on a
    choice that was changed (``--half`` on a CPU without native bf16) is shown as a warning."""
    try:
        chosen, note = choose_precision(precision, device, half)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if note:
        warn(note)
    return chosen
