"""What a run is made of (``TrainOptions``): a new run's options from what the user set, the recipe's values for the
rest, the checks, and the rules for which options may change on ``--resume``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from av2ts_cli.console import warn
from av2ts_cli.data.layout import check_split, check_subset
from av2ts_cli.errors import UsageError
from av2ts_cli.training.recipes import recipe_for

if TYPE_CHECKING:
    import torch


@dataclass
class TrainOptions:
    """Everything a run is made of; ``None`` fields take the preset's ``Recipe`` value (see ``resolved``)."""

    subset: str
    data: str
    model: str = "av2ts-r50"  # a preset (random init) or a checkpoint to start from (e.g. converted backbones)
    iters: int | None = None
    batch: int | None = None  # clips per iteration, all processes together
    lr: float | None = None
    backbone_lr_mult: float | None = None
    weight_decay: float | None = None
    decay_norms: bool | None = None  # weight decay on normalisation layers and embeddings too (AVSegFormer)
    clip_norm: float | None = None  # L2 norm of all gradients together; 0 turns clipping off
    poly_power: float | None = None  # 0: a constant LR
    amp: bool | None = None  # fp16 autocast + GradScaler, CUDA only
    bf16: bool = False  # bf16 autocast (CPU or CUDA)
    eval_every: int | None = None  # evaluate and save every N iterations (0: only at the end)
    eval_split: str = "val"
    augment: bool | None = None  # the reference's training augmentation; False: frames only resized
    ignore_padding: bool | None = None  # 255 pixels weigh 0 in the losses; False: negatives (the reference)
    epochs: int | None = None  # > 0 and no --iters: the run's length in epochs of the training set (``counted``)
    frozen_epochs: int | None = None  # the backbone is frozen for this many epochs (``counted``: unfreeze_at)
    unfreeze_at: int | None = None  # the first iteration that trains the backbone (0: all); from frozen_epochs
    log_every: int = 20
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    out: str | None = None

    def resolved(self, preset: str, device: torch.device) -> TrainOptions:
        """A copy with the recipe's values filled in and everything checked (UsageError)."""
        check_subset(self.subset)
        check_split(self.eval_split)
        recipe = recipe_for(preset, self.subset)
        amp = self.amp
        if amp is None:
            amp = recipe.amp and device.type == "cuda" and not self.bf16
        elif amp and device.type != "cuda":
            raise UsageError("--amp needs a CUDA device (fp16 autocast); on CPU use --bf16")
        epochs = recipe.epochs if self.epochs is None else self.epochs
        iters = self.iters
        if iters is None and not epochs:
            iters = recipe.iters
        out = dataclasses.replace(
            self, iters=iters, epochs=epochs,
            frozen_epochs=recipe.frozen_epochs if self.frozen_epochs is None else self.frozen_epochs,
            weight_decay=recipe.weight_decay if self.weight_decay is None else self.weight_decay,
            decay_norms=recipe.decay_norms if self.decay_norms is None else self.decay_norms,
            poly_power=recipe.poly_power if self.poly_power is None else self.poly_power,
            batch=recipe.batch if self.batch is None else self.batch, lr=recipe.lr if self.lr is None else self.lr,
            backbone_lr_mult=recipe.backbone_lr_mult if self.backbone_lr_mult is None else self.backbone_lr_mult,
            clip_norm=recipe.clip_norm if self.clip_norm is None else self.clip_norm, amp=bool(amp),
            augment=recipe.augment if self.augment is None else self.augment,
            ignore_padding=recipe.ignore_padding if self.ignore_padding is None else self.ignore_padding,
            eval_every=recipe.eval_every if self.eval_every is None else self.eval_every)
        problems = []
        if out.iters is not None and out.iters < 1:
            problems.append(f"--iters must be at least 1 (got {out.iters})")
        if out.epochs < 0 or out.frozen_epochs < 0 or (out.unfreeze_at is not None and out.unfreeze_at < 0):
            problems.append("the epochs, frozen epochs and unfreezing iteration must be >= 0")
        if out.poly_power < 0:
            problems.append(f"the poly power must be >= 0 (got {out.poly_power})")
        if out.batch < 1:
            problems.append(f"--batch must be at least 1 (got {out.batch})")
        if not out.lr > 0 or not math.isfinite(out.lr):
            problems.append(f"--lr must be positive (got {out.lr})")
        if out.backbone_lr_mult < 0 or out.weight_decay < 0 or out.clip_norm < 0:
            problems.append("the backbone LR factor, weight decay and clipping norm must be >= 0")
        if out.eval_every < 0 or out.log_every < 1 or out.workers < 0:
            problems.append("--eval-every must be >= 0, --log-every >= 1 and --workers >= 0")
        if out.amp and out.bf16:
            problems.append("--amp (fp16) and --bf16 exclude each other")
        if problems:
            raise UsageError("; ".join(problems))
        return out

    def counted(self, clips: int) -> TrainOptions:
        """A copy of resolved options with the epoch counts in iterations of a training set of ``clips`` clips at the
        run's batch: ``iters`` from ``epochs`` (when not given) and ``unfreeze_at`` from ``frozen_epochs`` (when not
        given). An epoch is ``clips / batch`` iterations of ``data_order.ClipOrder``'s stream, rounded up: iteration
        ``ceil(e * clips / batch)`` is the first one that takes no clip of epochs before e (the reference's loader
        gives ``ceil(clips / batch)`` batches per epoch, its last one short)."""
        def iterations(epochs: int) -> int:
            return -(-epochs * clips // self.batch)

        iters = self.iters if self.iters is not None else iterations(self.epochs)
        unfreeze_at = self.unfreeze_at if self.unfreeze_at is not None else iterations(self.frozen_epochs)
        if iters < 1:
            raise UsageError(f"--iters must be at least 1 (got {iters}: {self.epochs} epochs of {clips} clips)")
        return dataclasses.replace(self, iters=iters, unfreeze_at=unfreeze_at)


def new_options(given: dict) -> TrainOptions:
    """TrainOptions of a new run from the options the user set (``--subset`` and ``--data`` are required)."""
    missing = [f"--{name}" for name in ("subset", "data") if given.get(name) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} needed to start a run (or --resume a run)")
    unknown = set(given) - {f.name for f in dataclasses.fields(TrainOptions)}
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainOptions(**{k: str(v) if k == "data" else v for k, v in given.items()})


# Options that may differ on --resume (they do not change the result, or only extend it); the others must match.
RESUME_FREE = ("data", "workers", "device", "iters", "eval_every", "log_every")


def merge_resume_options(saved: TrainOptions, given: dict) -> TrainOptions:
    """The run's saved options updated with the given ones that may change; a given option that contradicts the run
    is a UsageError (``given``: only the options the user set)."""
    free = {k: v for k, v in given.items() if k in RESUME_FREE}
    for name, value in given.items():
        if name not in RESUME_FREE and value != getattr(saved, name):
            raise UsageError(f"--{name.replace('_', '-')} {value} contradicts the run being resumed "
                             f"({getattr(saved, name)}); leave it out")
    if "iters" in free and free["iters"] != saved.iters and saved.poly_power != 0:
        warn(f"--iters {free['iters']} changes the run's LR schedule (it had --iters {saved.iters})")
    return dataclasses.replace(saved, **free)
