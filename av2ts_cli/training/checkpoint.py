"""A run's checkpoints: ``last/`` (the network + ``trainer.pt``, everything else needed to continue) and ``best/``.

``trainer.pt`` holds the optimizer, scheduler and grad-scaler states, the iteration, the RNG states of Python, NumPy
and torch (per process), the data order and the run's options. It contains only tensors and plain Python values, so
it is read back with ``torch.load(weights_only=True)``; ``"format"`` and ``"version"`` say what it is.

``last`` is written whole into a temp folder and swapped in (``files.atomic_folder``), ``trainer.pt`` last of all,
so a kill at any moment leaves a complete previous or new ``last``. The one moment without a ``last`` (between the
two renames of the swap) leaves both complete folders beside it; ``find_resume_checkpoint`` takes the newer.

A Siam model's ``config.json`` says which maskiges it trained on (``maskige_provenance``: ``trained_on.maskiges``),
so that predict can tell whether the maskiges it is given come from the same generator and settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from av2ts_cli.data.layout import FORM_384, FORM_STANDARD, resolve_root
from av2ts_cli.errors import CheckpointError, DataError
from av2ts_cli.files import atomic_folder, atomic_path
from av2ts_cli.maskiges.dataset import maskige_root, provenance_path
from av2ts_cli.weights.checkpoint import save_checkpoint

LAST, BEST = "last", "best"
TRAINER_FILE = "trainer.pt"
TRAINER_FORMAT = "av2ts-trainer"
TRAINER_VERSION = 1


def _swap_leftovers(folder: Path) -> list[Path]:
    """The temp and old folders an interrupted swap of ``folder`` left beside it (``.last.<random>.partial`` and
    ``.last.<random>.old``: ``files.atomic_folder``'s names) that hold a trainer.pt, newest first."""
    found = [p for p in folder.parent.glob(f".{folder.name}.*") if p.is_dir() and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: (p / TRAINER_FILE).stat().st_mtime_ns, reverse=True)


def write_training_checkpoint(folder: Path, model: nn.Module, cfg, meta: dict, trainer_state: dict) -> None:
    """Checkpoint + trainer.pt (``trainer_state`` stamped with the format and version) as one unit: written into a
    temp folder, then swapped for ``folder``; what earlier interrupted swaps left beside it is removed after."""
    with atomic_folder(folder) as temp:
        save_checkpoint(model, cfg, temp, meta)
        with atomic_path(temp / TRAINER_FILE, durable=True) as path:  # last: a temp with trainer.pt is complete
            torch.save({"format": TRAINER_FORMAT, "version": TRAINER_VERSION, **trainer_state}, path)
    for leftover in folder.parent.glob(f".{folder.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


# what a provenance record (maskiges/dataset.py) says about the maskiges; the rest (times, counts) is not kept
_MASKIGE_KEYS = ("source", "generator", "repo", "revision", "model_type", "settings", "masks_from", "renderer")


def maskige_provenance(subset: str, data: str | os.PathLike, form: str = FORM_STANDARD) -> dict:
    """The maskiges a Siam model trains on: ``folder`` (``pre_SAM_mask/`` of the subset, or in VCT's 384 layout its
    384 maskiges' folder) and what the ``pre_SAM_mask.json`` beside it (``pre_SAM_mask_384.json``) records
    (``source`` "generator" with generator, repo, revision, model_type and settings, or "masks-from"). Without a
    record the source is "unknown": maskiges not made by ``av2ts maskiges``, such as COMBO's published ones
    (Semantic-SAM) or ``av2ts data synth``'s. The 384 layout without its own maskiges (or record) reads, resized,
    the standard ones: theirs is the record. DataError for a broken record."""
    root = resolve_root(data, subset)
    folder, path = maskige_root(root, subset, form), provenance_path(root, subset, form)
    if form == FORM_384 and not path.is_file() and (subset == "avss" or not folder.is_dir()):
        folder, path = maskige_root(root, subset), provenance_path(root, subset)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"folder": str(folder), "record": None, "source": "unknown"}
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable provenance record: {err}") from None
    if not isinstance(record, dict):
        raise DataError(path, "unreadable provenance record: not a JSON object")
    return {"folder": str(folder), "record": str(path), **{k: record.get(k) for k in _MASKIGE_KEYS if k in record}}


def find_resume_checkpoint(path: str | os.PathLike) -> Path:
    """The ``last`` folder of a run folder, or a checkpoint folder holding ``trainer.pt`` (or, when a kill came
    between the two renames of the swap, the newer of the two complete folders beside the missing ``last``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such run folder or checkpoint to resume")
    if not path.is_dir():
        raise CheckpointError(path, "not a folder: --resume takes a run folder (runs/train/NAME) or its last/")
    for candidate in (path, path / LAST, *_swap_leftovers(path / LAST)):
        if (candidate / TRAINER_FILE).is_file():
            return candidate
    raise CheckpointError(path, f"no {TRAINER_FILE} here or in {LAST}/: not a training run to resume (a run folder "
                                f"holds {LAST}/{TRAINER_FILE})")


def has_checkpoint(run: str | os.PathLike) -> bool:
    """Whether the run folder holds a checkpoint (``last/``, or a complete one an interrupted swap left beside
    it): a folder with only a log.csv is a run that failed before its first checkpoint."""
    if (Path(run) / LAST).exists():
        return True
    try:
        find_resume_checkpoint(run)
    except CheckpointError:
        return False
    return True


def read_trainer_state(path: Path) -> dict:
    """``trainer.pt`` read with ``weights_only=True``; CheckpointError (one line) when unreadable or not ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a foreign pickle: one line either way
        raise CheckpointError(path, f"unreadable trainer state: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(path, f"not an av2ts trainer state (expected \"format\": \"{TRAINER_FORMAT}\")")
    if int(state.get("version", 0)) > TRAINER_VERSION:
        raise CheckpointError(path, "written by a newer av2ts; upgrade to resume it")
    return state
