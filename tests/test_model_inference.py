"""model/inference.py: the precision choice (only the capability check is mocked), BatchNorm folding against the
unfolded network, and the bf16 fast path's answers against fp32 (real arithmetic, tiny networks, the demo model)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from av2ts_cli import cli, evaluate, processes
from av2ts_cli.config import EXAMPLE_FRAMES, MEL_BANDS, get_preset
from av2ts_cli.model import build_model, inference
from av2ts_cli.model.backbone import create_backbone
from av2ts_cli.model.blocks import FrozenBatchNorm2d
from av2ts_cli.model.inference import (
    choose_precision,
    default_precision,
    fold_frozen_batch_norm,
    precision_context,
    prepare_for_inference,
)
from av2ts_cli.weights.registry import DEMO_MODEL_DIR


def _clip(cfg, frames: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, frames, 3, size, size, generator=g) * 255
    audio = torch.randn(1, frames, EXAMPLE_FRAMES, MEL_BANDS, generator=g) - 2.0
    maskiges = torch.rand(1, frames, 3, size, size, generator=g) * 255 if cfg.siam else None
    return images, audio, maskiges


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-3) == b.argmax(-3)).double().mean())


# ------------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize("native", [True, False])
def test_default_precision_is_bf16_only_on_cpus_with_native_bf16(native, monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    assert default_precision("cpu") == ("bf16" if native else "fp32")
    assert default_precision("cuda") == "fp32"  # GPUs: fp32 unless asked (--half, --precision)
    assert choose_precision(None, "cpu") == (default_precision("cpu"), None)
    precision, note = choose_precision(None, "cpu", half=True)  # --half: the fast path, fp32 with a warning
    assert (precision, note is None) == (("bf16", True) if native else ("fp32", False))
    assert choose_precision("fp32", "cpu") == ("fp32", None)  # fp32 stays available
    precision, note = choose_precision("bf16", "cpu")  # asked for: honoured, with a warning where it is emulated
    assert precision == "bf16" and (note is None) == native


@pytest.mark.parametrize("measured", ["bf16", "fp32"])
def test_a_measured_cpu_precision_overrides_the_flags(measured, monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: measured == "fp32")  # the flags say the opposite
    assert default_precision("cpu", measured) == measured and default_precision("cuda", measured) == "fp32"
    assert choose_precision(None, "cpu", cpu_precision=measured) == (measured, None)
    precision, note = choose_precision(None, "cpu", half=True, cpu_precision=measured)
    assert precision == measured and (note is None) == (measured == "bf16")
    precision, note = choose_precision("bf16", "cpu", cpu_precision=measured)
    assert precision == "bf16" and (note is None) == (measured == "bf16")
    fast = {"bf16_speedup": inference.BF16_MARGIN}
    assert inference.precision_from_figures(fast) == "bf16"
    assert inference.precision_from_figures({"bf16_speedup": 0.56}) == "fp32"  # the Xeon of issue 21


def test_precision_validation():
    for bad, device, half, message in (("fp8", "cpu", False, "unknown precision 'fp8'"),
                                       ("fp16", "cpu", False, "fp16 needs a CUDA device"),
                                       ("fp32", "cpu", True, "--half is --precision bf16 on cpu"),
                                       ("bf16", "cuda", True, "--half is --precision fp16 on cuda")):
        with pytest.raises(ValueError, match=message):
            choose_precision(bad, device, half)
    assert choose_precision(None, "cuda", half=True) == ("fp16", None)
    assert cli._PRECISIONS == inference.PRECISIONS  # the CLI's early check spells the same values


# ------------------------------------------------------------------------------------------------ folding
def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


@pytest.mark.parametrize("frozen", [True, False])
def test_folded_batch_norm_equals_unfolded_backbone(frozen):
    """A ResNet backbone (FrozenBatchNorm2d as av2ts-r50's, or eval-mode BatchNorm2d as av2ts-tiny's) with random
    statistics gives the same maps after folding, and no norm is left."""
    cfg = dataclasses.replace(get_preset("av2ts-tiny"), frozen_bn=frozen)
    backbone = create_backbone(cfg).eval()
    _randomise_norms(backbone)
    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    count = sum(isinstance(m, norm) for m in backbone.modules())
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone(x)
        assert fold_frozen_batch_norm(backbone) == count > 0
        got = backbone(x)
    assert not any(isinstance(m, norm) for m in backbone.modules())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_folding_that_would_change_the_output_is_undone():
    """A convolution whose output also feeds an addition beside its norm cannot be folded: the probe check catches
    it, the module is restored and ValueError raised."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = FrozenBatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    module = Shared().eval()
    _randomise_norms(module)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = module(x)
        weight = module.conv.weight.clone()
        with pytest.raises(ValueError, match="changed its output"):
            fold_frozen_batch_norm(module)
        torch.testing.assert_close(module(x), before)
    assert isinstance(module.bn, FrozenBatchNorm2d) and torch.equal(module.conv.weight, weight)


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("preset", ["av2ts-tiny", "combo-tiny"])
def test_fast_path_agrees_with_fp32(preset):
    """The bf16 CPU path (weights cast, BatchNorm folded, channels_last, the pixel decoder in bf16) against the
    fp32 network: argmax equal on at least 99.5% of the pixels; fp32 folding alone is equal to rounding."""
    cfg = dataclasses.replace(get_preset(preset), siam=True)  # the Siam encoder too, as av2ts-r50
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _randomise_norms(model)
    clip = _clip(cfg)
    fast = prepare_for_inference(copy.deepcopy(model), "bf16", "cpu")
    folded = prepare_for_inference(copy.deepcopy(model), "fp32", "cpu")
    assert next(fast.decoder.parameters()).dtype == torch.bfloat16
    assert next(fast.pixel_decoder.parameters()).dtype == torch.bfloat16
    assert fast.pixel_mean.dtype == torch.float32  # the input normalisation stays exact
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in fast.backbone.modules())
    with torch.inference_mode():
        reference = model.segment(*clip)
        with precision_context("bf16", "cpu"):
            scores = fast.segment(*clip)
        exact = folded.segment(*clip)
    assert scores.dtype == torch.float32 and scores.shape == reference.shape
    assert _agreement(scores, reference) >= 0.995
    # fp32: folding and the lean decoder (intermediate masks at the attention sizes) are equal up to rounding
    torch.testing.assert_close(exact, reference, rtol=1e-3, atol=1e-4)
    assert not folded.decoder.full_masks and model.decoder.full_masks
    with torch.inference_mode():
        lean, full = folded(*clip), model(*clip)
    assert lean["aux_outputs"] == [] and len(full["aux_outputs"]) == cfg.decoder_layers
    torch.testing.assert_close(lean["pred_masks"], full["pred_masks"], rtol=1e-3, atol=1e-3)


def test_fast_path_on_the_demo_model_and_synthetic_eval(synth_data, monkeypatch, tmp_path):
    """The bundled demo model (trained weights) evaluated on synthetic S4 in fp32 and in the default bf16 path:
    mIoU within 0.005, F-score within 0.01."""
    monkeypatch.setattr(processes, "cpu_precision", lambda: {"precision": "bf16", "figures": {}})  # the bf16 path
    reports = {precision: evaluate.evaluate("s4", synth_data, model=str(DEMO_MODEL_DIR), device="cpu",
                                            precision=precision, workers=0, progress=False,
                                            out=tmp_path / str(precision))
               for precision in ("fp32", None)}
    fp32, default = reports["fp32"], reports[None]
    assert (fp32["precision"], default["precision"]) == ("fp32", "bf16")
    assert default["precision_basis"]["asked"] == "auto" and fp32["precision_basis"]["measured"] is None
    assert abs(fp32["miou"] - default["miou"]) <= 0.005
    assert abs(fp32["fscore"] - default["fscore"]) <= 0.01
