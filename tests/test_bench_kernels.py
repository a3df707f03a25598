"""``av2ts bench kernels`` end to end at a small size (the 224/512 px targets are checked by running the bench)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.bench import kernels


def test_bench_kernels_quick_json(cpp_kernel):
    result = CliRunner().invoke(cli.app, ["bench", "kernels", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "cpp" and report["device"] == "cpu" and report["device_name"]
    (case,) = report["cases"]
    assert case["input_size"] == 64 and case["levels"] == [[8, 8], [4, 4], [2, 2]] and case["queries"] == 84
    assert case["max_abs_difference"] < 1e-5
    for name in ("forward", "forward_backward"):
        timing = case[name]
        assert timing["fallback_ms"] > 0 and timing["kernel_ms"] > 0
        # both ms figures are rounded to 0.01 ms: at ~0.5 ms that alone moves their ratio by ~1%
        assert timing["speedup"] == pytest.approx(timing["fallback_ms"] / timing["kernel_ms"], rel=0.03, abs=0.06)
    assert set(case["peak_memory_mib"]) == {"fallback_forward", "kernel_forward", "fallback_forward_backward",
                                            "kernel_forward_backward"}


def test_inputs_are_reference_points_plus_small_offsets():
    value, shapes, starts, locations, weights = kernels.make_inputs(224, frames=2)
    assert shapes.tolist() == [[28, 28], [14, 14], [7, 7]] and starts.tolist() == [0, 784, 980]
    assert value.shape == (2, 1029, 8, 32) and locations.shape == (2, 1029, 8, 3, 4, 2)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 1029, 8))
    # query 0 is the top-left pixel of level 0: its samples stay within a few pixels of it at every level
    pixels = locations[:, 0] * shapes.flip(-1).view(1, 1, 3, 1, 2)
    centre = (torch.tensor([0.5, 0.5]) / 28 * shapes.flip(-1)).view(1, 1, 3, 1, 2)
    assert (pixels - centre).abs().max() < 12 and (pixels - centre).abs().mean() < 2.5


def test_bench_refuses_a_forced_fallback(monkeypatch):
    monkeypatch.setenv("AV2TS_DEFORM_ATTN", "torch")
    result = CliRunner().invoke(cli.app, ["bench", "kernels", "--quick"])
    assert result.exit_code == 2 and "AV2TS_DEFORM_ATTN=torch" in result.output


def test_peer_without_the_package_is_a_one_line_usage_error(monkeypatch):
    # None in sys.modules makes ``import torch_ms_deform_attn`` fail as if it were not installed
    monkeypatch.setitem(sys.modules, kernels.PEER_MODULE, None)
    result = CliRunner().invoke(cli.app, ["bench", "kernels", "--quick", "--peer"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --peer:") and "torch-ms-deform-attn is not installed" in line
    assert "pip install --no-build-isolation torch-ms-deform-attn==0.1.1" in line and "setuptools" in line


def test_peer_quick_case_reports_the_same_operation(cpp_kernel):
    pytest.importorskip(kernels.PEER_MODULE, reason="the peer package torch-ms-deform-attn is installed by hand "
                        "(not in av2ts's install, so CI does not have it): " + kernels.PEER_INSTALL)
    result = CliRunner().invoke(cli.app, ["bench", "kernels", "--quick", "--peer", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["peer"]["package"] == "torch-ms-deform-attn" and report["peer"]["version"] == "0.1.1"
    (case,) = report["cases"]
    check = case["peer"]
    assert check["equal"] and check["output_max_abs_difference"] < 1e-5
    assert set(check["gradient_max_rel_difference"]) == {"value", "sampling_locations", "attention_weights"}
    assert max(check["gradient_max_rel_difference"].values()) < 1e-4
    for name in ("forward", "forward_backward"):
        timing = case[name]
        assert timing["peer_ms"] > 0
        assert timing["peer_over_kernel"] == pytest.approx(timing["peer_ms"] / timing["kernel_ms"], rel=0.01,
                                                           abs=0.006)
    assert {"peer_forward", "peer_forward_backward"} <= set(case["peak_memory_mib"])


def test_peer_report_prints_ratios_and_the_agreement(cpp_kernel):
    pytest.importorskip(kernels.PEER_MODULE, reason="the peer package torch-ms-deform-attn is installed by hand "
                        "(not in av2ts's install, so CI does not have it): " + kernels.PEER_INSTALL)
    result = CliRunner().invoke(cli.app, ["bench", "kernels", "--quick", "--peer"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "peer/kernel" in result.output and "64 px, peer vs kernel: same operation" in result.output
