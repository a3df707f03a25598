"""Training of AV2TS (``av2ts train``), one concern per module:

- ``recipes``: the per-preset defaults (``Recipe``, ``RECIPES``, ``recipe_for``); standard library only;
- ``options``: ``TrainOptions``, a new run's options, which options ``--resume`` may change;
- ``optim``: the parameter groups, AdamW, the poly schedule, ``optimisation_step``;
- ``criterion``: the loss (Hungarian-matched set losses); with training, not in ``model/``, as in SAM 2;
- ``criterion_avsegformer``: AVSegFormer's own loss (Dice or masked cross-entropy, plus the mix loss);
- ``data_order``: which clips each iteration trains on, and the DataLoader;
- ``processes``: one process or one rank of a torchrun job (DDP), and its device;
- ``rng``: seeding and the global RNG states saved with a checkpoint;
- ``checkpoint``: ``last/`` and ``best/``, ``trainer.pt`` (written, found, read);
- ``log``: ``log.csv``;
- ``trainer``: the loop (``Trainer``, set up in ``_setup_*`` steps), ``train`` and ``print_report``.

The names below are loaded on first use, so ``import av2ts_cli.training.recipes`` (the CLI's help texts) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from av2ts_cli.training.checkpoint import find_resume_checkpoint, read_trainer_state
    from av2ts_cli.training.log import read_log
    from av2ts_cli.training.options import TrainOptions
    from av2ts_cli.training.recipes import RECIPES, Recipe, recipe_for
    from av2ts_cli.training.trainer import print_report, train

_HOMES = {"train": "trainer", "print_report": "trainer",
          "TrainOptions": "options", "Recipe": "recipes", "RECIPES": "recipes", "recipe_for": "recipes",
          "find_resume_checkpoint": "checkpoint", "read_trainer_state": "checkpoint", "read_log": "log"}
__all__ = ["RECIPES", "Recipe", "TrainOptions", "find_resume_checkpoint", "print_report",
           "read_log", "read_trainer_state", "recipe_for", "train"]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # local: the trainer imports torch (seconds); loading it on first use keeps `av2ts --help` instant
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
