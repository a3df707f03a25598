"""The training loop (``Trainer``) and ``train``: iteration-based training of AV2TS on an AVSBench subset.

The recipe is in ``recipes`` and ``optim``; see docs/model.md, "Training". The best checkpoint is chosen on the val
split by default (``--eval-split``): the reference AV2TS configs evaluate on, and pick the best checkpoint by, the
test split.

A run lives in ``runs/train/NAME/`` (``exp``, ``exp2``, ... unless ``--out`` names it)::

    last/   model.safetensors + config.json (an av2ts checkpoint) + trainer.pt (everything else to continue)
    best/   the checkpoint with the best mIoU on the evaluation split (default val)
    log.csv iteration, losses, lr, seconds, val metrics
    results.png   log.csv's curves, redrawn at every evaluation and at the end (``plots.write_results``)

(``checkpoint`` and ``log``). Bit-for-bit resume rests on three rules: (1) the data order and every augmentation
are functions of (seed, global clip position), not of any RNG state (``data_order``); (2) nothing but the training
step draws from the global RNGs (the DataLoader gets its own generator; the evaluation runs inside
``rng.preserved_rng``); (3) the RNG states are saved with the checkpoint and restored last. Bit for bit means on
the same machine with the same number of threads (float sums depend on the split of work).

DistributedDataParallel when started by ``torchrun`` (``processes``): the global batch of ``--batch`` clips is the
same list of clips as with one process, cut into ``world_size`` equal slices; every rank steps on the averaged
gradient; only rank 0 writes files, evaluates and shows progress. The criterion averages its mask count over ranks
(Mask2Former), so the loss has the single-process scale. Trainable BatchNorm layers (``av2ts-tiny``) see per-rank
batches on CPU (SyncBatchNorm needs CUDA; on CUDA they are converted).

Exit on SIGINT/SIGTERM: the current iteration finishes, ``last`` is saved, and the run stops with exit code
128 + signal (130 for SIGINT, 143 for SIGTERM); ``--resume`` continues it. A second SIGINT stops at once
(``interrupts.StopSignals``). ``--resume`` with a larger ``--iters`` goes on along the poly schedule of the new length,
from where the run stands (``optim.set_poly_horizon``).

A recipe's frozen epochs (AVSegFormer's) keep the visual backbone frozen up to ``options.unfreeze_at``, an iteration
counted from the training set when the run starts (``TrainOptions.counted``) and recorded with the run; a resumed
run takes the frozen or trained state of its iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from av2ts_cli import locks
from av2ts_cli.console import console, make_progress, warn
from av2ts_cli.data import build_dataset
from av2ts_cli.data.layout import form_for
from av2ts_cli.errors import Av2tsError, CheckpointError, UsageError, describe
from av2ts_cli.evaluate import evaluate_model
from av2ts_cli.interrupts import Interrupted, StopSignals
from av2ts_cli.plots import write_results
from av2ts_cli.predictor import Predictor
from av2ts_cli.processes import Processes
from av2ts_cli.runs import LOG_FILE, RESULTS_FILE, claim_folder, numbered_run_folder, record_owned, remove_owned
from av2ts_cli.training.checkpoint import (
    BEST,
    LAST,
    TRAINER_FILE,
    find_resume_checkpoint,
    has_checkpoint,
    maskige_provenance,
    read_trainer_state,
    write_training_checkpoint,
)
from av2ts_cli.training.criterion import build_criterion
from av2ts_cli.training.data_order import ClipOrder, training_loader
from av2ts_cli.training.log import TrainLog
from av2ts_cli.training.optim import LOSS_GROUPS, PolySchedule, build_optimizer, optimisation_step, set_poly_horizon
from av2ts_cli.training.options import TrainOptions, merge_resume_options, new_options
from av2ts_cli.training.rng import preserved_rng, rng_state, seed_everything, set_rng_state
from av2ts_cli.weights.checkpoint import save_checkpoint
from av2ts_cli.weights.resolve import load_checkpoint, resolve_model

RUNS_FOLDER = Path("runs") / "train"


class Trainer:
    """One run: set up from the user's options (a new run) or from a run's ``last/`` (``resume``), then ``fit``.

    The set-up runs in steps, in this order (the order of the random draws is part of bit-for-bit resume):
    ``_setup_options``, ``_setup_data``, ``_setup_model``, ``_setup_run``, ``_setup_distributed``, ``_setup_log``."""

    def __init__(self, given: dict, resume: str | os.PathLike | None, processes: Processes, progress: bool,
                 held: contextlib.ExitStack | None = None):
        """``held``: where the run folder's lock is kept (``locks``; rank 0 only, the one process that writes the
        run); the caller closes it when the run is over, also when this constructor fails."""
        self.processes = processes
        self.progress = progress and processes.main
        self._held = held if held is not None else contextlib.ExitStack()
        state, model = self._setup_options(given, resume)
        self._setup_data()
        self._setup_model(model)
        self._setup_run(state)
        self._setup_distributed()
        self._setup_log(state)

    # -------------------------------------------------------------------------------------------------- setup
    def _setup_options(self, given: dict, resume: str | os.PathLike | None) -> tuple[dict | None, nn.Module]:
        """The run's options, config and start, and its model on the CPU -> (the trainer state of the run resumed
        or None, the model). Resume: the run's ``last/`` (locked by rank 0), its state and options merged with the
        given ones, its weights. New: the given options over the recipe's, the seed, the model resolved (a preset
        with random weights, or a checkpoint)."""
        state = None
        if resume is not None:
            checkpoint = find_resume_checkpoint(resume)
            if self.processes.main:  # "runs/train/exp: in use by av2ts pid N" while another run trains it
                # wait=15: DataLoader workers of a killed run still hold its lock until they notice (every 5 s)
                self._held.enter_context(locks.held(checkpoint.parent, wait=15.0))
                checkpoint = find_resume_checkpoint(resume)  # again, locked: its last holder may have swapped last/
                locks.sweep_temps(checkpoint.parent, recursive=False, folders=False)  # a log temp a kill left
            state = read_trainer_state(checkpoint / TRAINER_FILE)
            try:
                # a run saved before --ignore-padding existed trained with that rule: resume it with the same rule
                saved = TrainOptions(**{"ignore_padding": True, **state["options"]})
            except TypeError as err:
                raise CheckpointError(checkpoint / TRAINER_FILE, f"unexpected run options: {err}") from None
            options = merge_resume_options(saved, given)
            model, cfg, _ = load_checkpoint(checkpoint)
            self.run = checkpoint.parent
            self.start = int(state["iteration"])
        else:
            options = new_options(given)
            seed_everything(options.seed)
            # a preset (random init) or a checkpoint, e.g. one with converted backbones (`av2ts convert`)
            model, cfg, _ = resolve_model(options.model, subset=options.subset, presets=True)
            self.start = 0
        self.options = options = options.resolved(cfg.preset, self.processes.device)
        self.cfg = cfg
        # recorded in config.json: predict compares the maskiges it is given with these (a Siam model sees
        # different masks when another generator or other settings made them)
        self.maskiges = maskige_provenance(options.subset, options.data, form_for(cfg.family)) if cfg.siam else None
        return state, model

    def _setup_data(self) -> None:
        """The training set (and, on rank 0, the evaluation set), the options' epochs in iterations of it
        (``TrainOptions.counted``: the run's length, the iteration that unfreezes the backbone) and the data order."""
        options, processes = self.options, self.processes
        self.train_set = self._dataset("train", train=options.augment)
        self.eval_set = self._dataset(options.eval_split, train=False) if processes.main else None
        if len(self.train_set) == 0:
            raise UsageError(f"{options.data}: the train split of {options.subset} has no videos")
        self.options = options = options.counted(len(self.train_set))
        if self.start >= options.iters:
            raise UsageError(f"the run is already at iteration {self.start} of --iters {options.iters}; give a larger "
                             f"--iters to train on")
        self.order = ClipOrder(len(self.train_set), options.batch, options.seed, processes.rank,
                               processes.world_size)

    def _setup_model(self, model: nn.Module) -> None:
        """The model on its device (SyncBatchNorm under DDP on CUDA), the criterion, the optimizer, the LR schedule
        and the gradient scaler, all new (``_setup_run`` restores a resumed run's states into them). The optimizer
        holds the backbone's parameters even when the run starts with it frozen (as the reference's
        ``AdamW(model.parameters())``; AdamW skips a parameter without a gradient), and the backbone is frozen when
        the run stands before ``unfreeze_at`` (a resumed run too: the state follows from its iteration)."""
        options, device = self.options, self.processes.device
        if self.processes.distributed and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm over the global batch
        self.model = model.to(device).train()
        self.criterion = build_criterion(self.cfg, ignore_padding=options.ignore_padding).to(device)
        self.optimizer = build_optimizer(self.model, options.lr, options.weight_decay, options.backbone_lr_mult,
                                         options.decay_norms)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           PolySchedule(options.iters, options.poly_power))
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.amp)
        if options.unfreeze_at:
            if not callable(getattr(self.model, "freeze_backbone", None)):
                raise UsageError(f"{self.cfg.preset} cannot train with a frozen backbone (its network has no "
                                 f"freeze_backbone); leave the frozen epochs at 0")
            self.model.freeze_backbone(self.start < options.unfreeze_at)

    def _setup_run(self, state: dict | None) -> None:
        """Resume: the optimizer, schedule, scaler, best and elapsed time of the run (``_restore``). New: the
        training seed of this rank, and the run folder (made and locked by rank 0, its path sent to all)."""
        self.best = {"miou": None, "iteration": None}
        self.elapsed = 0.0
        if state is not None:
            self._restore(state)
        else:
            seed_everything(self.options.seed + self.processes.rank)
            self.run = self._new_run_folder()

    def _setup_distributed(self) -> None:
        """``network``, what the step runs: the model, wrapped in DistributedDataParallel under torchrun."""
        self.network = self.model
        if self.processes.distributed:
            device = self.processes.device
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def _setup_log(self, state: dict | None) -> None:
        """``log.csv`` (rank 0; a resumed one loses the rows after the checkpoint), and the RNG states that ``fit``
        restores last."""
        self.log = TrainLog(self.run / LOG_FILE, resume_at=self.start if state is not None else None) \
            if self.processes.main else None
        self._rng_to_restore = state["rng"] if state is not None else None
        self._curves_warned = False  # results.png: one warning per run when it cannot be drawn

    def _dataset(self, split: str, train: bool):
        return build_dataset(self.options.subset, self.options.data, split, cfg=self.cfg, train=train,
                             seed=self.options.seed if train else None)

    def _new_run_folder(self) -> Path:
        run = None
        if self.processes.main:
            if self.options.out is not None:
                run = Path(self.options.out)
                # made if missing; removed again if the run leaves it empty (a refused or failed start)
                self._held.enter_context(locks.held(run, remove_empty_folder=True))
                if has_checkpoint(run) or (run / BEST).exists():  # best/ alone: a trained model all the same
                    raise UsageError(f"{run} already holds a training run; continue it with --resume {run} or "
                                     f"choose another --out")
                # a folder av2ts did not make (a user's log.csv, anything) is refused, naming it; a log.csv av2ts
                # wrote is a run that failed before its first checkpoint: reused
                claim_folder(run, hint="choose another --out")
                # files only: a checkpoint's temp folder may be the newest complete one (find_resume_checkpoint)
                locks.sweep_temps(run, recursive=False, folders=False)
            else:
                run = numbered_run_folder(RUNS_FOLDER)
                self._held.enter_context(locks.held(run, remove_empty_folder=True))
            record_owned(run, [LOG_FILE])  # before the log is written
        return Path(self.processes.gather(str(run) if run else None)[0])

    def discard_unsaved(self) -> None:
        """After a failure: a new run without a checkpoint loses its log.csv, so the folder (removed when empty as
        its lock is released) does not look like a run, and the same command starts again in it."""
        run = getattr(self, "run", None)
        if self.processes.main and run is not None and self.start == 0 and not has_checkpoint(run):
            # with its record when nothing else is av2ts's: the empty folder can go
            remove_owned(run, [LOG_FILE, RESULTS_FILE])

    def _restore(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            # it restored the saved horizon too: the schedule follows this run's --iters (a larger one extends it)
            set_poly_horizon(self.scheduler, self.options.iters, self.options.poly_power)
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
            warn(f"the run used {state.get('world_size', 1)} processes, this one {self.processes.world_size}: "
                 "same data order, but the random streams differ from an uninterrupted run")
        self.best = dict(state.get("best") or self.best)
        self.elapsed = float(state.get("elapsed", 0.0))

    def _loader(self) -> DataLoader:
        options = self.options
        return training_loader(self.train_set, self.order, self.start, options.iters, options.workers, options.seed,
                               pin_memory=self.processes.device.type == "cuda")

    # ---------------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train from ``start`` to ``options.iters`` -> the report (see ``train``); interrupts.Interrupted on a
        signal, after saving ``last``."""
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
        with contextlib.ExitStack() as stack, StopSignals() as stop:
            if bar is not None:
                stack.enter_context(bar)
                task = bar.add_task("training", total=options.iters, completed=self.start)
            for batch in self._loader():
                if iteration == options.unfreeze_at and iteration > 0:  # the first iteration that trains it
                    self._unfreeze_backbone()
                losses = self._run_step(batch)
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
                    self._draw_curves()
                if bar is not None:
                    loss_text = f" loss {row['loss']:.3f}" if row and row.get("loss") is not None else ""
                    bar.update(task, completed=iteration,
                               description=f"training{loss_text}" if loss_text else None)
                if flags[-1] > 0 and not last_step:
                    self.elapsed = time.perf_counter() - started
                    self._save(iteration, None)
                    signum = stop.signum or signal.SIGTERM
                    raise Interrupted(signum, f"stopped at iteration {iteration}, saved {self.run / LAST}; "
                                      f"continue with `av2ts train --resume {self.run}`")
        return self._report(iteration, time.perf_counter() - started)

    def _run_step(self, batch: dict) -> torch.Tensor:
        """One optimisation step on this process's share of the batch -> float64 [1 + groups]: the total loss and
        the loss groups (this process's values). The step itself is ``optim.optimisation_step``, the one
        ``av2ts bench train`` times."""
        return optimisation_step(self.network, self.criterion, self.optimizer, self.scheduler, self.scaler, batch,
                                 self.processes.device, self.cfg.siam, self.options.clip_norm, self._autocast())

    def _unfreeze_backbone(self) -> None:
        """The backbone trains from now on (``unfreeze_at``). DistributedDataParallel reduces only the gradients of
        the parameters that required one when it was built, so it is built again."""
        self.model.freeze_backbone(False)
        if self.processes.distributed:
            self._setup_distributed()

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
        if self.processes.main:
            task = bar.add_task(f"evaluating {self.options.eval_split}", total=None) if bar is not None else None
            # the model under training, as it is (no inference preparation: it trains on): the run's autocast, if
            # any, covers the forward (the predictor's own precision is fp32, a null context)
            predictor = Predictor(self.model, self.cfg, [], "the model under training", self.processes.device, "fp32")
            with preserved_rng(), self._autocast():
                metrics = evaluate_model(predictor, self.eval_set, "av2ts", batch=max(1, self.options.batch),
                                         workers=min(self.options.workers, 2))
            if task is not None:
                bar.remove_task(task)
            row["val_miou"], row["val_fscore"] = float(metrics["miou"]), float(metrics["fscore"])
        self.processes.barrier()

    def _draw_curves(self) -> None:
        """Rank 0 redraws ``results.png`` from ``log.csv``. A picture that cannot be drawn (a file of the user's in
        its place, a full disk) is one warning per run, and the training goes on."""
        if not self.processes.main:
            return
        try:
            write_results(self.run)
        except Exception as err:  # the picture is a view of log.csv: nothing about it may stop the training
            if not self._curves_warned:
                warn(f"{RESULTS_FILE} not drawn: {describe(err) or f'{type(err).__name__}: {err}'}")
                self._curves_warned = True

    def _save(self, iteration: int, row: dict | None) -> None:
        """``last`` (+ trainer.pt) and, when the evaluation improved, ``best``. All processes take part (RNG
        states are gathered); rank 0 writes."""
        rng = self.processes.gather(rng_state())
        miou = None if row is None else row.get("val_miou")
        improved = miou is not None and (self.best["miou"] is None or miou > self.best["miou"])
        if improved:
            self.best = {"miou": miou, "iteration": iteration}
        if self.processes.main:
            meta = self._meta(iteration, row)
            write_training_checkpoint(self.run / LAST, self.model, self.cfg, meta, {
                "iteration": iteration,
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
                               "videos": len(self.train_set), "maskiges": self.maskiges},
                "training": {"iteration": iteration, "iters": options.iters, "batch": options.batch,
                             "lr": options.lr, "seed": options.seed, "started_from": options.model}}
        if options.unfreeze_at:
            meta["training"]["backbone_unfrozen_at"] = options.unfreeze_at
        if row is not None and row.get("val_miou") is not None:
            meta["evaluation"] = {"split": options.eval_split, "protocol": "av2ts", "miou": row["val_miou"],
                                  "fscore": row["val_fscore"]}
        return meta

    def _report(self, iteration: int, seconds: float) -> dict:
        return {"run": str(self.run), "iterations": iteration, "seconds": round(seconds, 1),
                "last": str(self.run / LAST), "best": str(self.run / BEST) if self.best["miou"] is not None else None,
                "best_miou": self.best["miou"], "best_iteration": self.best["iteration"],
                "eval_split": self.options.eval_split, "processes": self.processes.world_size,
                "backbone_unfrozen_at": self.options.unfreeze_at,
                "device": str(self.processes.device)}


def train(resume: str | os.PathLike | None = None, progress: bool = True, **options) -> dict:
    """Train a new run (``options``: TrainOptions fields; None means "not given": the recipe's or the default
    value) or continue one (``resume``: a run folder or its last/; given options must agree with the run, except
    data, workers, device, iters, eval_every, log_every). Returns {run, iterations, seconds, last, best, best_miou,
    best_iteration, eval_split, processes, device}. On SIGINT/SIGTERM: saves ``last``, raises interrupts.Interrupted."""
    given = {k: v for k, v in options.items() if v is not None}
    if "data" in given:
        given["data"] = str(given["data"])
    processes = Processes.start(given.get("device", "auto"))
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, released (and an empty folder removed) last
            trainer = None
            try:
                trainer = Trainer(given, resume, processes, progress, held)
                report = trainer.fit()
            except BaseException:
                if trainer is not None:
                    trainer.discard_unsaved()
                raise
        return report if processes.main else None
    finally:
        processes.stop()


def print_report(report: dict) -> None:
    """The report of ``train`` in two lines."""
    best = (f"; best {report['eval_split']} mIoU {report['best_miou']:.4f} at iteration {report['best_iteration']}"
            if report.get("best_miou") is not None else "")
    console.print(f"Trained {report['iterations']} iterations in {report['seconds']:.0f} s{best}", markup=False)
    console.print(f"Results saved to {report['run']}", markup=False)
