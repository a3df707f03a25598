"""``av2ts train``: iteration-based training of AV2TS on an AVSBench subset (design.md section 5, model.md 9-10).

The reference recipe (model.md section 10): AdamW, weight decay 0.05 (0 on normalisation layers and embeddings),
backbone LR x0.1 (the visual backbone and the Siam encoder; the audio encoder is frozen), the detectron2 poly
schedule ``lr = base * (1 - it / iters) ** 0.9`` without warm-up, gradient clipping of the whole model's L2 norm at
0.01, a batch counted in clips, evaluation and a checkpoint every N iterations, the best checkpoint by mIoU.
``RECIPES`` holds the per-preset defaults; ``av2ts-tiny`` (trained from scratch, no pretrained backbone) has its own,
measured on the synthetic data (see ``RECIPES``). The best checkpoint is chosen on the val split by default
(``--eval-split``): the reference AV2TS configs evaluate on, and pick the best checkpoint by, the test split.

A run lives in ``runs/train/NAME/`` (``exp``, ``exp2``, ... unless ``--out`` names it)::

    last/   model.safetensors + config.json (an av2ts checkpoint) + trainer.pt (everything else to continue)
    best/   the checkpoint with the best mIoU on the evaluation split (default val)
    log.csv iteration, losses, lr, seconds, val metrics

``trainer.pt`` holds the optimizer, scheduler and grad-scaler states, the iteration, the RNG states of Python,
NumPy and torch (per process), the data order and the run's options; it contains only tensors and plain Python
values, so it is read back with ``torch.load(weights_only=True)``. ``last`` is written whole into a staging folder
and swapped in, so a kill at any moment leaves a complete previous or new ``last``.

Bit-for-bit resume rests on three rules: (1) the data order and every augmentation are functions of (seed, global
clip position), not of any RNG state (``ClipOrder``; the dataset draws each clip's augmentation from (seed, epoch,
index)); (2) nothing but the training step draws from the global RNGs (the DataLoader gets its own generator; the
evaluation runs inside ``_preserved_rng``); (3) the RNG states are saved with the checkpoint and restored last.
Bit for bit means on the same machine with the same number of threads (float sums depend on the split of work).

DistributedDataParallel when started by ``torchrun`` (gloo on CPU, nccl on CUDA): the global batch of ``--batch``
clips is the same list of clips as with one process, cut into ``world_size`` equal slices; every rank steps on the
averaged gradient; only rank 0 writes files, evaluates and shows progress. The criterion averages its mask count
over ranks (Mask2Former), so the loss has the single-process scale. Trainable BatchNorm layers (``av2ts-tiny``) see
per-rank batches on CPU (SyncBatchNorm needs CUDA; on CUDA they are converted).

Exit on SIGINT/SIGTERM: the current iteration finishes, ``last`` is saved, and the run stops with exit code
128 + signal (130 for SIGINT, 143 for SIGTERM); ``--resume`` continues it. A second SIGINT stops at once.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from av2ts_cli.errors import Av2tsError, CheckpointError, UsageError

RUNS_FOLDER = Path("runs") / "train"
LAST, BEST = "last", "best"
TRAINER_FILE = "trainer.pt"
LOG_FILE = "log.csv"
TRAINER_FORMAT = "av2ts-trainer"
TRAINER_VERSION = 1
LOSS_GROUPS = ("loss_ce", "loss_mask", "loss_dice", "loss_cosine")  # each summed over the decoder layers
LOG_COLUMNS = ("iteration", "loss", *LOSS_GROUPS, "lr", "seconds", "val_miou", "val_fscore")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
              nn.LocalResponseNorm)


# ------------------------------------------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class Recipe:
    """Per-preset training defaults: iterations, global batch (clips), base LR, backbone LR factor, gradient clipping,
    AMP (CUDA only) and the training augmentation."""

    iters: int
    batch: int
    lr: float = 1e-4
    backbone_lr_mult: float = 0.1
    clip_norm: float = 0.01
    amp: bool = False
    augment: bool = True


# r50/pvt: the reference configs (model.md section 10). av2ts-tiny trains from random weights (no pretrained backbone,
# a random frozen CED) on the synthetic data in minutes; measured on synthetic S4 (tests/test_train.py,
# assets/README.md), each of these departures made it learn faster:
# - lr 1e-3, backbone x1: the reference's 1e-4 and x0.1 suit pretrained backbones;
# - no gradient clipping: clipping the whole gradient at 0.01 scales every element to ~1e-6 and below, where
#   AdamW's eps (1e-8) damps the updates of the small-gradient parts (the layer-scaled OSA blocks: ~1e-10): 0.80 vs
#   0.59 val mIoU after 500 iterations on the same data and seed;
# - no augmentation: the synthetic clips vary enough; the reference's random resize (0.5-2x) and crop slow the start
#   (0.88 vs 0.84 at 500 iterations, 0.65 vs 0.39 at 100);
# - batch 2: more, cheaper steps for the same CPU time.
_TINY = Recipe(3_000, 2, lr=1e-3, backbone_lr_mult=1.0, clip_norm=0.0, augment=False)
RECIPES: dict[tuple[str, str], Recipe] = {
    ("av2ts-r50", "s4"): Recipe(90_000, 8),
    ("av2ts-r50", "ms3"): Recipe(20_000, 8),
    ("av2ts-r50", "avss"): Recipe(180_000, 8, amp=True),
    ("av2ts-pvt", "s4"): Recipe(180_000, 4),
    ("av2ts-pvt", "ms3"): Recipe(40_000, 4),
    ("av2ts-pvt", "avss"): Recipe(180_000, 4, amp=True),
    ("av2ts-tiny", "s4"): _TINY,
    ("av2ts-tiny", "ms3"): _TINY,
    ("av2ts-tiny", "avss"): _TINY,
}


def recipe_for(preset: str, subset: str) -> Recipe:
    return RECIPES.get((preset, subset)) or RECIPES.get((preset, "s4")) or Recipe(90_000, 8)


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
    weight_decay: float = 0.05
    clip_norm: float | None = None  # L2 norm of all gradients together; 0 turns clipping off
    poly_power: float = 0.9
    amp: bool | None = None  # fp16 autocast + GradScaler, CUDA only
    bf16: bool = False  # bf16 autocast (CPU or CUDA)
    eval_every: int = 100  # evaluate and save every N iterations (0: only at the end)
    eval_split: str = "val"
    augment: bool | None = None  # the reference's training augmentation; False: frames only resized
    log_every: int = 20
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    out: str | None = None

    def resolved(self, preset: str, device: torch.device) -> TrainOptions:
        """A copy with the recipe's values filled in and everything checked (UsageError)."""
        from av2ts_cli.data.layout import check_split, check_subset

        check_subset(self.subset)
        check_split(self.eval_split)
        recipe = recipe_for(preset, self.subset)
        amp = self.amp
        if amp is None:
            amp = recipe.amp and device.type == "cuda" and not self.bf16
        elif amp and device.type != "cuda":
            raise UsageError("--amp needs a CUDA device (fp16 autocast); on CPU use --bf16")
        out = dataclasses.replace(
            self, iters=recipe.iters if self.iters is None else self.iters,
            batch=recipe.batch if self.batch is None else self.batch, lr=recipe.lr if self.lr is None else self.lr,
            backbone_lr_mult=recipe.backbone_lr_mult if self.backbone_lr_mult is None else self.backbone_lr_mult,
            clip_norm=recipe.clip_norm if self.clip_norm is None else self.clip_norm, amp=bool(amp),
            augment=recipe.augment if self.augment is None else self.augment)
        problems = []
        if out.iters < 1:
            problems.append(f"--iters must be at least 1 (got {out.iters})")
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


# ------------------------------------------------------------------------------------------- optimizer, schedule
def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """detectron2/Mask2Former ``build_optimizer`` groups: every trainable parameter gets ``lr`` (x
    ``backbone_lr_mult`` inside a module whose name contains "backbone": our ``backbone`` and ``siam_backbone``,
    the reference's ``backbone`` and ``pre_sam_backbone``) and ``weight_decay`` (0 for parameters of normalisation
    layers and embeddings). Parameters with equal settings share a group (the reference has one group per
    parameter; AdamW's update is per element, so that changes nothing)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group_lr = lr * backbone_lr_mult if "backbone" in module_name else lr
            decay = weight_decay
            if isinstance(module, (*NORM_TYPES, nn.Embedding)) or name in ("relative_position_bias_table",
                                                                            "absolute_pos_embed"):
                decay = 0.0
            groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": params, "lr": group_lr, "weight_decay": decay}
            for (group_lr, decay), params in groups.items()]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, backbone_lr_mult: float = 0.1
                    ) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, lr, weight_decay, backbone_lr_mult), lr=lr,
                             weight_decay=weight_decay)


def optimisation_step(network: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                      scaler: torch.amp.GradScaler, batch: dict, device: torch.device, siam: bool,
                      clip_norm: float = 0.01, autocast=None) -> torch.Tensor:
    """Forward, criterion, backward, clipping of the whole gradient's L2 norm, optimizer and scheduler step.

    batch: collated data items (frames uint8 [B, T, 3, S, S], audio [B, T, 96, 64], masks int64 [B, T, S, S],
    supervised bool [B, T], maskiges when ``siam``). Returns float64 [1 + len(LOSS_GROUPS)] on the CPU: the total
    loss, then each loss group summed over the decoder layers."""
    frames = batch["frames"].to(device, non_blocking=True).float()
    audio = batch["audio"].to(device, non_blocking=True)
    maskiges = batch["maskiges"].to(device, non_blocking=True).float() if siam else None
    targets = {"masks": batch["masks"].to(device, non_blocking=True),
               "supervised": batch["supervised"].to(device, non_blocking=True)}
    with autocast or contextlib.nullcontext():
        outputs = network(frames, audio, maskiges)
    losses = criterion(outputs, targets)  # the criterion computes in fp32 itself
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    groups = [sum((v.detach().float() for k, v in losses.items() if k.startswith(g)), torch.zeros((), device=device))
              for g in LOSS_GROUPS]
    return torch.stack([loss.detach().float(), *groups]).double().cpu()


class PolySchedule:
    """detectron2 ``WarmupPolyLR`` without warm-up: the LR factor at iteration ``it`` is (1 - it / iters) ** power.
    A class (not a lambda) so ``LambdaLR.state_dict`` can store it."""

    def __init__(self, iters: int, power: float = 0.9):
        self.iters = int(iters)
        self.power = float(power)

    def __call__(self, iteration: int) -> float:
        return (1.0 - min(iteration, self.iters) / self.iters) ** self.power


# ------------------------------------------------------------------------------------------------- data order
class ClipOrder:
    """The global stream of training clips: epoch e is a permutation of the clips drawn from (seed, e); the clip at
    global position p is ``permutation(p // n)[p % n]``. Iteration i uses positions [i * batch, (i + 1) * batch);
    rank r of w takes the r-th of w equal slices. So the order is a pure function of the position: resuming at any
    iteration, with any number of DataLoader workers, gives the same clips, and w processes together see exactly
    the clips of one process with the same global batch."""

    def __init__(self, num_clips: int, batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch % world_size:
            raise UsageError(f"--batch {batch} must be a multiple of the number of processes ({world_size})")
        self.num_clips, self.batch, self.seed = num_clips, batch, seed
        self.rank, self.world_size = rank, world_size
        self._permutation: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_clips))
        return self._permutation[1]

    def clips(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (epoch, clip index) pairs of an iteration."""
        share = self.batch // self.world_size
        start = iteration * self.batch + self.rank * share
        return [(p // self.num_clips, int(self.permutation(p // self.num_clips)[p % self.num_clips]))
                for p in range(start, start + share)]

    def state(self, iteration: int) -> dict:
        return {"seed": self.seed, "batch": self.batch, "clips": self.num_clips, "position": iteration * self.batch}


class _IterationBatches(Sampler):
    """Batch sampler over iterations [start, stop): each batch is ``ClipOrder.clips(iteration)``."""

    def __init__(self, order: ClipOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start, self.stop):
            yield self.order.clips(iteration)

    def __len__(self) -> int:
        return self.stop - self.start


class _EpochIndexed(Dataset):
    """A training dataset indexed by (epoch, clip): the clip's augmentation is drawn from (seed, epoch, clip)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)  # each worker holds its own copy of the dataset
        return self.dataset[index]


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the workers leave it to the main process, which saves and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------- processes
@dataclass
class Processes:
    """This process's place in a (possibly one-process) distributed run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: str) -> Processes:
        """Join the process group when started by torchrun (WORLD_SIZE > 1), else one process."""
        from av2ts_cli.runs import resolve_device

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        requested = resolve_device(device)
        if world_size <= 1:
            return cls(device=requested)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if requested.type == "cuda":
            requested = torch.device("cuda", local_rank)
            torch.cuda.set_device(requested)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if requested.type == "cuda" else "gloo")
        return cls(rank, world_size, local_rank, requested)

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


# -------------------------------------------------------------------------------------------------------- RNGs
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                    "pos": int(pos), "has_gauss": int(has_gauss),
                                                    "cached_gaussian": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _preserved_rng():
    """Run a block (the evaluation) without moving any global RNG: the training continues as if it had not run."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ------------------------------------------------------------------------------------------------- run folders
class TrainingInterrupted(Av2tsError):
    """SIGINT/SIGTERM: ``last`` was saved; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, iteration: int, run: Path):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} at iteration {iteration}: saved {run / LAST}; continue with "
                         f"`av2ts train --resume {run}`")


def find_resume_checkpoint(path: str | os.PathLike) -> Path:
    """The ``last`` folder of a run folder, or a checkpoint folder holding ``trainer.pt``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such run folder or checkpoint to resume")
    if not path.is_dir():
        raise CheckpointError(path, "not a folder: --resume takes a run folder (runs/train/NAME) or its last/")
    for candidate in (path, path / LAST, path / f".{LAST}.staging"):
        if (candidate / TRAINER_FILE).is_file():
            return candidate
    raise CheckpointError(path, f"no {TRAINER_FILE} here or in {LAST}/: not a training run to resume (a run folder "
                                f"holds {LAST}/{TRAINER_FILE})")


def read_trainer_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a foreign pickle: one line either way
        raise CheckpointError(path, f"unreadable trainer state: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(path, f"not an av2ts trainer state (expected \"format\": \"{TRAINER_FORMAT}\")")
    if int(state.get("version", 0)) > TRAINER_VERSION:
        raise CheckpointError(path, "written by a newer av2ts; upgrade to resume it")
    return state


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_training_checkpoint(folder: Path, model: nn.Module, cfg, meta: dict, trainer_state: dict) -> None:
    """Checkpoint + trainer.pt as one unit: written into a staging folder, then swapped for ``folder``."""
    from av2ts_cli.weights import save_checkpoint

    staging = folder.parent / f".{folder.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, cfg, staging, meta)
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    (staging / TRAINER_FILE).write_bytes(buffer.getvalue())
    _fsync(staging / TRAINER_FILE)
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


class TrainLog:
    """``log.csv``: one row per logged or evaluated iteration. On resume, rows after the checkpoint are dropped
    (they belong to iterations that will run again)."""

    def __init__(self, path: Path, resume_at: int | None = None):
        self.path = path
        rows = []
        if resume_at is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("iteration", "").isdigit()
                        and int(r["iteration"]) <= resume_at]
        temp = path.with_name(f".{path.name}.tmp")
        with open(temp, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in LOG_COLUMNS} for r in rows)
        os.replace(temp, path)

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


# ------------------------------------------------------------------------------------------------------ trainer
class _StopSignals:
    """SIGINT/SIGTERM set a flag the loop checks after each iteration; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if _in_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Trainer:
    def __init__(self, given: dict, resume: str | os.PathLike | None, processes: Processes, progress: bool):
        from av2ts_cli.weights import load_checkpoint

        self.processes = processes
        self.progress = progress and processes.main
        device = processes.device
        state = None
        if resume is not None:
            checkpoint = find_resume_checkpoint(resume)
            state = read_trainer_state(checkpoint / TRAINER_FILE)
            try:
                saved = TrainOptions(**state["options"])
            except TypeError as err:
                raise CheckpointError(checkpoint / TRAINER_FILE, f"unexpected run options: {err}") from None
            options = _merge_resume_options(saved, given)
            model, cfg, _ = load_checkpoint(checkpoint)
            self.run = checkpoint.parent
            self.start = int(state["iteration"])
        else:
            options = new_options(given)
            seed_everything(options.seed)
            model, cfg = _initial_model(options.model, options.subset)
            self.start = 0
        self.options = options = options.resolved(cfg.preset, device)
        self.cfg = cfg
        if self.start >= options.iters:
            raise UsageError(f"the run is already at iteration {self.start} of --iters {options.iters}; give a larger "
                             f"--iters to train on")

        self.train_set = self._dataset("train", train=options.augment)
        self.eval_set = self._dataset(options.eval_split, train=False) if processes.main else None
        if len(self.train_set) == 0:
            raise UsageError(f"{options.data}: the train split of {options.subset} has no videos")
        self.order = ClipOrder(len(self.train_set), options.batch, options.seed, processes.rank,
                               processes.world_size)

        if processes.distributed and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm over the global batch
        self.model = model.to(device).train()
        self.criterion = _build_criterion(cfg).to(device)
        self.optimizer = build_optimizer(self.model, options.lr, options.weight_decay, options.backbone_lr_mult)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           PolySchedule(options.iters, options.poly_power))
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.amp)
        self.best = {"miou": None, "iteration": None}
        self.elapsed = 0.0
        if state is not None:
            self._restore(state)
        else:
            seed_everything(options.seed + processes.rank)
            self.run = self._new_run_folder()
        self.network = self.model
        if processes.distributed:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.log = TrainLog(self.run / LOG_FILE, resume_at=self.start if state is not None else None) \
            if processes.main else None
        self._rng_to_restore = state["rng"] if state is not None else None

    # -------------------------------------------------------------------------------------------------- setup
    def _dataset(self, split: str, train: bool):
        from av2ts_cli.data import build_dataset

        return build_dataset(self.options.subset, self.options.data, split, cfg=self.cfg, train=train,
                             seed=self.options.seed if train else None)

    def _new_run_folder(self) -> Path:
        from av2ts_cli.runs import numbered_run_folder

        run = None
        if self.processes.main:
            if self.options.out is not None:
                run = Path(self.options.out)
                if (run / LAST).exists() or (run / LOG_FILE).exists():
                    raise UsageError(f"{run} already holds a training run; continue it with --resume {run} or "
                                     f"choose another --out")
                run.mkdir(parents=True, exist_ok=True)
            else:
                run = numbered_run_folder(RUNS_FOLDER)
        return Path(self.processes.gather(str(run) if run else None)[0])

    def _restore(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(self.run / LAST / TRAINER_FILE, f"does not fit this model: {err}") from None
        order = state["data_order"]
        if order["clips"] != len(self.train_set) or order["batch"] != self.options.batch:
            raise CheckpointError(self.run / LAST / TRAINER_FILE,
                                  f"the run trained on {order['clips']} clips with batch {order['batch']}; "
                                  f"{self.options.data} has {len(self.train_set)} training clips")
        if state.get("world_size", 1) != self.processes.world_size:
            from av2ts_cli.console import warn

            warn(f"the run used {state.get('world_size', 1)} processes, this one {self.processes.world_size}: "
                 "same data order, but the random streams differ from an uninterrupted run")
        self.best = dict(state.get("best") or self.best)
        self.elapsed = float(state.get("elapsed", 0.0))

    def _loader(self) -> DataLoader:
        options = self.options
        return DataLoader(
            _EpochIndexed(self.train_set),
            batch_sampler=_IterationBatches(self.order, self.start, options.iters),
            num_workers=options.workers, collate_fn=_collate, pin_memory=self.processes.device.type == "cuda",
            worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(options.seed),
            persistent_workers=False, prefetch_factor=2 if options.workers else None)

    # ---------------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        from av2ts_cli.console import make_progress

        options, processes = self.options, self.processes
        if self._rng_to_restore is not None:
            states = self._rng_to_restore
            if len(states) == processes.world_size:
                set_rng_state(states[processes.rank])
            else:
                seed_everything(options.seed + processes.rank + self.start)
        sums = torch.zeros(1 + len(LOSS_GROUPS), dtype=torch.float64)
        logged_iterations = 0
        iteration = self.start
        started = time.perf_counter() - self.elapsed
        bar = make_progress() if self.progress else None
        with contextlib.ExitStack() as stack, _StopSignals() as stop:
            if bar is not None:
                stack.enter_context(bar)
                task = bar.add_task("training", total=options.iters, completed=self.start)
            for batch in self._loader():
                losses = self._step(batch)
                iteration += 1
                # one small all-reduce per iteration: the loss terms, and whether any process was signalled
                flags = torch.cat([losses, torch.tensor([float(stop.signum != 0)], dtype=torch.float64)])
                flags = processes.sum(flags)
                values = flags[:-1] / processes.world_size
                if not torch.isfinite(values[0]):
                    raise Av2tsError(f"the loss is not finite at iteration {iteration} (lower --lr; without --amp or "
                                     "--bf16 if they are on)")
                sums += values
                logged_iterations += 1
                row = None
                if iteration % options.log_every == 0 or iteration == options.iters:
                    row = self._loss_row(iteration, sums / logged_iterations, time.perf_counter() - started)
                    sums.zero_()
                    logged_iterations = 0
                last_step = iteration == options.iters
                checkpoint = last_step or (options.eval_every and iteration % options.eval_every == 0)
                if checkpoint:
                    row = row or self._loss_row(iteration, None, time.perf_counter() - started)
                    self._evaluate(row, bar)
                if row is not None and processes.main:
                    self.log.write(row)  # before the checkpoint: a resumed log always has the rows up to it
                if checkpoint:
                    self.elapsed = time.perf_counter() - started
                    self._save(iteration, row)
                if bar is not None:
                    loss_text = f" loss {row['loss']:.3f}" if row and row.get("loss") is not None else ""
                    bar.update(task, completed=iteration,
                               description=f"training{loss_text}" if loss_text else None)
                if flags[-1] > 0 and not last_step:
                    self.elapsed = time.perf_counter() - started
                    self._save(iteration, None)
                    signum = stop.signum or signal.SIGTERM
                    raise TrainingInterrupted(signum, iteration, self.run)
        return self._report(iteration, time.perf_counter() - started)

    def _step(self, batch: dict) -> torch.Tensor:
        """One optimisation step on this process's share of the batch -> float64 [1 + groups]: the total loss and
        the loss groups (this process's values)."""
        return optimisation_step(self.network, self.criterion, self.optimizer, self.scheduler, self.scaler, batch,
                                 self.processes.device, self.cfg.siam, self.options.clip_norm, self._autocast())

    def _autocast(self):
        device = self.processes.device
        if self.options.amp:
            return torch.autocast(device.type, dtype=torch.float16)
        if self.options.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_row(self, iteration: int, values: torch.Tensor | None, seconds: float) -> dict:
        row = {"iteration": iteration, "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 2)}
        if values is not None:
            row.update(loss=float(values[0]), **{g: float(v) for g, v in zip(LOSS_GROUPS, values[1:], strict=True)})
        return row

    def _evaluate(self, row: dict, bar) -> None:
        """Rank 0 scores the evaluation split; the others wait at the barrier."""
        from av2ts_cli.evaluate import evaluate_model

        if self.processes.main:
            task = bar.add_task(f"evaluating {self.options.eval_split}", total=None) if bar is not None else None
            with _preserved_rng(), self._autocast():
                metrics = evaluate_model(self.model, self.eval_set, "av2ts", batch=max(1, self.options.batch),
                                         device=self.processes.device, workers=min(self.options.workers, 2))
            if task is not None:
                bar.remove_task(task)
            row["val_miou"], row["val_fscore"] = float(metrics["miou"]), float(metrics["fscore"])
        self.processes.barrier()

    def _save(self, iteration: int, row: dict | None) -> None:
        """``last`` (+ trainer.pt) and, when the evaluation improved, ``best``. All processes take part (RNG
        states are gathered); rank 0 writes."""
        rng = self.processes.gather(rng_state())
        miou = None if row is None else row.get("val_miou")
        improved = miou is not None and (self.best["miou"] is None or miou > self.best["miou"])
        if improved:
            self.best = {"miou": miou, "iteration": iteration}
        if self.processes.main:
            from av2ts_cli.weights import save_checkpoint

            meta = self._meta(iteration, row)
            write_training_checkpoint(self.run / LAST, self.model, self.cfg, meta, {
                "format": TRAINER_FORMAT, "version": TRAINER_VERSION, "iteration": iteration,
                "options": dataclasses.asdict(self.options), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "data_order": self.order.state(iteration), "best": self.best,
                "world_size": self.processes.world_size, "elapsed": self.elapsed})
            if improved:
                save_checkpoint(self.model, self.cfg, self.run / BEST, meta)
        self.processes.barrier()

    def _meta(self, iteration: int, row: dict | None) -> dict:
        options = self.options
        meta = {"trained_on": {"subset": options.subset, "data": str(options.data), "split": "train",
                               "videos": len(self.train_set)},
                "training": {"iteration": iteration, "iters": options.iters, "batch": options.batch,
                             "lr": options.lr, "seed": options.seed, "started_from": options.model}}
        if row is not None and row.get("val_miou") is not None:
            meta["evaluation"] = {"split": options.eval_split, "protocol": "av2ts", "miou": row["val_miou"],
                                  "fscore": row["val_fscore"]}
        return meta

    def _report(self, iteration: int, seconds: float) -> dict:
        return {"run": str(self.run), "iterations": iteration, "seconds": round(seconds, 1),
                "last": str(self.run / LAST), "best": str(self.run / BEST) if self.best["miou"] is not None else None,
                "best_miou": self.best["miou"], "best_iteration": self.best["iteration"],
                "eval_split": self.options.eval_split, "processes": self.processes.world_size,
                "device": str(self.processes.device)}


def _initial_model(name: str, subset: str):
    """(model, cfg) a new run starts from: a preset (random init) or a checkpoint (a folder, hf://, a registry
    name), e.g. one with converted backbones (`av2ts convert --kind detectron2`)."""
    from av2ts_cli.config import PRESET_NAMES, get_preset
    from av2ts_cli.model import build_model
    from av2ts_cli.weights import HF_PREFIX, REGISTRY, load_model

    if name in PRESET_NAMES and not Path(name).exists():
        cfg = get_preset(name, subset)
        return build_model(cfg), cfg
    if not (Path(name).exists() or name.startswith(HF_PREFIX) or name in REGISTRY):
        raise UsageError(f"--model {name!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a checkpoint "
                         "(a folder, hf://owner/repo or a registry name)")
    model, cfg = load_model(name)
    if cfg.subset != subset and {cfg.subset, subset} != {"s4", "ms3"}:
        raise UsageError(f"{name} is a {cfg.subset} model; --subset is {subset}")
    return model, dataclasses.replace(cfg, subset=subset)


def _collate(items: list[dict]) -> dict:
    from av2ts_cli.data import collate_clips

    return collate_clips(items)


def _build_criterion(cfg):
    from av2ts_cli.model.criterion import build_criterion

    return build_criterion(cfg)


# Options that may differ on --resume (they do not change the result, or only extend it); the others must match.
_RESUME_FREE = ("data", "workers", "device", "iters", "eval_every", "log_every")


def _merge_resume_options(saved: TrainOptions, given: dict) -> TrainOptions:
    """The run's saved options updated with the given ones that may change; a given option that contradicts the run
    is a UsageError (``given``: only the options the user set)."""
    free = {k: v for k, v in given.items() if k in _RESUME_FREE}
    for name, value in given.items():
        if name not in _RESUME_FREE and value != getattr(saved, name):
            raise UsageError(f"--{name.replace('_', '-')} {value} contradicts the run being resumed "
                             f"({getattr(saved, name)}); leave it out")
    if "iters" in free and free["iters"] != saved.iters:
        from av2ts_cli.console import warn

        warn(f"--iters {free['iters']} changes the run's LR schedule (it had --iters {saved.iters})")
    return dataclasses.replace(saved, **free)


def new_options(given: dict) -> TrainOptions:
    """TrainOptions of a new run from the options the user set (``--subset`` and ``--data`` are required)."""
    missing = [f"--{name}" for name in ("subset", "data") if given.get(name) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} needed to start a run (or --resume a run)")
    unknown = set(given) - {f.name for f in dataclasses.fields(TrainOptions)}
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainOptions(**{k: str(v) if k == "data" else v for k, v in given.items()})


def train(resume: str | os.PathLike | None = None, progress: bool = True, **options) -> dict:
    """Train a new run (``options``: TrainOptions fields; None means "not given": the recipe's or the default
    value) or continue one (``resume``: a run folder or its last/; given options must agree with the run, except
    data, workers, device, iters, eval_every, log_every). Returns {run, iterations, seconds, last, best, best_miou,
    best_iteration, eval_split, processes, device}. On SIGINT/SIGTERM: saves ``last``, raises TrainingInterrupted."""
    given = {k: v for k, v in options.items() if v is not None}
    if "data" in given:
        given["data"] = str(given["data"])
    processes = Processes.start(given.get("device", "auto"))
    try:
        report = Trainer(given, resume, processes, progress).fit()
        return report if processes.main else None
    finally:
        processes.stop()


def print_report(report: dict) -> None:
    from av2ts_cli.console import console

    best = (f"; best {report['eval_split']} mIoU {report['best_miou']:.4f} at iteration {report['best_iteration']}"
            if report.get("best_miou") is not None else "")
    console.print(f"Trained {report['iterations']} iterations in {report['seconds']:.0f} s{best}")
    console.print(f"Results saved to {report['run']}")
