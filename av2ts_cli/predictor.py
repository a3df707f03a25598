"""A loaded network and how to run it: ``Predictor``, the one way ``predict`` and ``eval`` load a model (by the
names ``--model`` takes, onto a device, in a precision) and run its forward (``Predictor.segment``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from av2ts_cli.config import ModelConfig
from av2ts_cli.console import info
from av2ts_cli.errors import UsageError
from av2ts_cli.model.inference import precision_context, prepare_for_inference
from av2ts_cli.processes import resolve_device, resolve_precision
from av2ts_cli.weights.registry import DEMO_MODEL_DIR
from av2ts_cli.weights.resolve import check_finite_output, resolve_model

if TYPE_CHECKING:
    from av2ts_cli.model import AV2TS

DEMO_NOTE = ("Using the bundled demo model (av2ts-tiny trained on synthetic 'sounding shapes': it finds sounding "
             "shapes, not real objects; real checkpoints come through --model and `av2ts convert`).")


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class Predictor:
    """A loaded network and how to run it."""

    model: AV2TS  # eval mode, on ``device``
    cfg: ModelConfig
    class_names: list[str]
    name: str  # what --model said (or "demo")
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16" (model.inference: bf16 on a CPU is the whole forward in bf16)
    trained_on: dict | str | None = None  # config.json's "trained_on" (Siam models: which maskiges, see predict)
    weights_sha256: str | None = None  # the weights file's content hash (None: a preset's random weights)
    precision_basis: dict | None = None  # processes.resolve_precision: what was asked, the CPU's measured figures

    @property
    def binary(self) -> bool:
        return self.cfg.num_classes == 2

    def segment(self, frames: torch.Tensor, audio: torch.Tensor, maskiges: torch.Tensor | None = None,
                where: str = "") -> torch.Tensor:
        """THE forward of ``predict`` and ``eval``: frames [B, T, 3, S, S] with values 0-255 (uint8 or float), audio
        [B, T, 96, 64] log-mel, maskiges like frames or None -> semantic maps [B, T, K, S, S] on ``device`` (the
        network's ``segment``, under inference mode and the autocast of ``precision``). A map holding NaN or
        infinite values is a CheckpointError naming the model (``where``: which window or clips)."""
        with torch.inference_mode(), precision_context(self.precision, self.device):
            out = self.model.segment(frames.to(self.device, non_blocking=True), audio.to(self.device),
                                     None if maskiges is None else maskiges.to(self.device, non_blocking=True))
        check_finite_output(out, self.model, self.name, where)  # NaN weights: an error, not empty masks
        return out

    def segment_pictures(self, frames: np.ndarray, audio: torch.Tensor, maskiges: np.ndarray | None = None
                         ) -> torch.Tensor:
        """``segment`` of decoded pictures: frames uint8 [B, T, S, S, 3] RGB, maskiges like frames or None ->
        semantic maps [B, T, K, S, S] float32 on the CPU."""

        def channels_first(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).permute(0, 1, 4, 2, 3)

        out = self.segment(channels_first(frames), audio, None if maskiges is None else channels_first(maskiges))
        return out.float().cpu()

    def describe(self) -> dict:
        return {"name": self.name, "preset": self.cfg.preset, "subset": self.cfg.subset,
                "num_classes": self.cfg.num_classes, "classes": self.class_names, "input_size": self.cfg.input_size,
                "num_frames": self.cfg.num_frames, "siam": self.cfg.siam, "device": str(self.device),
                "precision": self.precision, "precision_basis": self.precision_basis,
                "weights_sha256": self.weights_sha256}


def make_predictor(model: AV2TS, cfg: ModelConfig, class_names: Sequence[str], name: str,
                   device: str | torch.device = "auto",
                   half: bool = False, trained_on: dict | str | None = None, precision: str | None = None
                   ) -> Predictor:
    """Move ``model`` to the device, pick the precision (``--precision``, None: the default, measured on a CPU;
    ``--half``: the fast path) and prepare the model for it (``processes.resolve_precision`` and
    ``prepare_for_inference``)."""
    target = resolve_device(device)
    precision, basis = resolve_precision(precision, target, half)
    model = prepare_for_inference(model, precision, target)
    return Predictor(model, cfg, list(class_names), name, target, precision, trained_on, precision_basis=basis)


def load_predictor(name: str | None, device: str | torch.device = "auto", half: bool = False,
                   precision: str | None = None, subset: str | None = None, presets: bool = False) -> Predictor:
    """THE loader of a model for ``predict``, ``eval`` and ``api.load_model``: ``--model``
    (``resolve.resolve_model``: a checkpoint folder or file, hf://..., a registry name; None: the demo model) on
    ``device`` in ``precision``; ``subset``: the model must fit it (``eval``); ``presets``: a preset name is a
    randomly initialised network (the API's, for a training loop of one's own; ``subset`` or s4)."""
    if name is None:
        info(DEMO_NOTE)
        source, label = str(DEMO_MODEL_DIR), "demo"
        if not DEMO_MODEL_DIR.is_dir():
            raise UsageError(f"the bundled demo model is missing ({DEMO_MODEL_DIR}); pass --model")
    else:
        source, label = name, name
    model, cfg, doc = resolve_model(source, subset=subset, presets=presets)
    predictor = make_predictor(model, cfg, doc.get("classes") or [], label, device, half, doc.get("trained_on"),
                               precision)
    predictor.weights_sha256 = doc.get("weights_sha256")
    return predictor
