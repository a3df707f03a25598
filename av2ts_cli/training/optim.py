"""The optimisation step and what it is made of: the reference's parameter groups, AdamW, the poly LR schedule
(``set_poly_horizon`` moves its end on resume).

The reference recipe (docs/model.md, "Training"): AdamW, weight decay 0.05 (0 on normalisation layers and
embeddings), backbone LR x ``backbone_lr_mult`` (the visual backbone and the Siam encoder; the audio encoder is
frozen), the detectron2 poly schedule ``lr = base * (1 - it / iters) ** 0.9`` without warm-up, gradient clipping of
the whole model's L2 norm.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LOSS_GROUPS = ("loss_ce", "loss_mask", "loss_dice", "loss_cosine", "loss_mix", "loss_proto")  # each summed over
# decoder layers; loss_mix: AVSegFormer's mix loss (training.criterion_avsegformer); loss_proto: VCT's PAC term
# (training.criterion_vct)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
              nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float,
                     decay_norms: bool = False) -> list[dict]:
    """detectron2/Mask2Former ``build_optimizer`` groups: every trainable parameter gets ``lr`` (x
    ``backbone_lr_mult`` inside a module whose name contains "backbone": our ``backbone`` and ``siam_backbone``,
    the reference's ``backbone`` and ``pre_sam_backbone``) and ``weight_decay`` (0 for parameters of normalisation
    layers and embeddings, unless ``decay_norms``: AVSegFormer's ``AdamW(model.parameters())`` decays every
    parameter alike). Parameters with equal settings share a group (the reference has one group per parameter;
    AdamW's update is per element, so that changes nothing). "Trainable" is ``requires_grad`` when called: a
    backbone frozen for the first iterations (``Recipe.frozen_epochs``) must still be trainable here."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group_lr = lr * backbone_lr_mult if "backbone" in module_name else lr
            decay = weight_decay
            if not decay_norms and (isinstance(module, (*NORM_TYPES, nn.Embedding))
                                    or name in ("relative_position_bias_table", "absolute_pos_embed")):
                decay = 0.0
            groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": params, "lr": group_lr, "weight_decay": decay}
            for (group_lr, decay), params in groups.items()]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, backbone_lr_mult: float = 0.1,
                    decay_norms: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, lr, weight_decay, backbone_lr_mult, decay_norms), lr=lr,
                             weight_decay=weight_decay)


class PolySchedule:
    """detectron2 ``WarmupPolyLR`` without warm-up: the LR factor at iteration ``it`` is (1 - it / iters) ** power.
    Power 0 is a constant LR (the factor is exactly 1.0 at every iteration: AVSegFormer's recipe). A class (not a
    lambda) so ``LambdaLR.state_dict`` can store it."""

    def __init__(self, iters: int, power: float = 0.9):
        self.iters = int(iters)
        self.power = float(power)

    def __call__(self, iteration: int) -> float:
        return (1.0 - min(iteration, self.iters) / self.iters) ** self.power


def set_poly_horizon(scheduler: torch.optim.lr_scheduler.LambdaLR, iters: int, power: float) -> None:
    """Make ``scheduler`` (a ``LambdaLR`` of ``PolySchedule``) end at ``iters``, at the step it is at.

    ``LambdaLR.load_state_dict`` restores the saved schedule's horizon along with its step, so a run resumed with a
    larger ``--iters`` would keep the old one (a finished run, extended, would train at LR 0). Here the schedule is
    rebuilt with ``iters``, ``last_epoch`` stays, and the optimizer's LRs (the ones the next step uses) and
    ``get_last_lr`` become the new schedule's values there, ``base_lr * (1 - last_epoch / iters) ** power``. With
    the saved ``iters`` and ``power`` every value stays exactly as it was."""
    schedule = PolySchedule(iters, power)
    scheduler.lr_lambdas = [schedule] * len(scheduler.optimizer.param_groups)  # as LambdaLR(optimizer, schedule)
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)  # LambdaLR.get_lr, which warns outside step()
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what LambdaLR.step sets


def supervised_frames(batch: dict) -> dict:
    """The batch's supervised frames, each as a clip of one frame: frames, audio, masks, maskiges [N, 1, ...],
    supervised all true [N, 1], and the per-clip lists ("category", "video") repeated for each of its frames. For a
    network whose frames never see each other (``frames_independent``: VCT), the losses and their gradients are
    those of the whole batch, at the cost of the supervised frames alone (an S4 training clip has one of five). A
    batch without a supervised frame is returned as it is."""
    supervised = batch["supervised"]
    b, t = supervised.shape
    rows = supervised.flatten().nonzero().squeeze(1)
    if rows.shape[0] == 0 or rows.shape[0] == b * t:
        return batch
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (b, t):
            out[key] = value.flatten(0, 1)[rows].unsqueeze(1)
        elif isinstance(value, list) and len(value) == b:
            out[key] = [value[int(row) // t] for row in rows]
        else:
            out[key] = value
    return out


def optimisation_step(network: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                      scaler: torch.amp.GradScaler, batch: dict, device: torch.device, siam: bool,
                      clip_norm: float = 0.01, autocast=None) -> torch.Tensor:
    """Forward, criterion, backward, clipping of the whole gradient's L2 norm, optimizer and scheduler step.

    batch: collated data items (frames uint8 [B, T, 3, S, S], audio [B, T, 96, 64], masks int64 [B, T, S, S],
    supervised bool [B, T], maskiges when ``siam``, the clips' "category" names). A network with
    ``frames_independent`` runs only the supervised frames (``supervised_frames``). Returns float64
    [1 + len(LOSS_GROUPS)] on the CPU: the total loss, then each loss group summed over the decoder layers."""
    if getattr(getattr(network, "module", network), "frames_independent", False):  # DDP wraps the model
        batch = supervised_frames(batch)
    frames = batch["frames"].to(device, non_blocking=True).float()
    audio = batch["audio"].to(device, non_blocking=True)
    maskiges = batch["maskiges"].to(device, non_blocking=True).float() if siam else None
    targets = {"masks": batch["masks"].to(device, non_blocking=True),
               "supervised": batch["supervised"].to(device, non_blocking=True)}
    if "category" in batch:
        targets["category"] = batch["category"]
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
