"""Start-up: `av2ts --help`, help of every verb, usage errors and "no such file" answer without importing torch
(it costs 2.5-27 s and ~800 MB before anything can be said), each in a fresh interpreter."""

from __future__ import annotations

import json

import pytest
from conftest import run_python

HEAVY = ("torch", "torchaudio", "timm", "cv2", "transformers", "huggingface_hub", "scipy", "matplotlib")

CHECK = """
import json, sys
sys.argv = ["av2ts", *{args!r}]
from av2ts_cli.cli import main
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def _start(args: list[str]) -> dict:
    result = run_python(CHECK.format(args=args, heavy=HEAVY))
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stderr": result.stderr, "stdout": result.stdout}


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["predict", "--help"], ["train", "--help"],
                                  ["eval", "--help"], ["data", "synth", "--help"], ["info", "--help"],
                                  ["plot", "--help"]])
def test_help_imports_nothing_heavy(args):
    started = _start(args)
    assert started["code"] == 0 and started["heavy"] == [], started["heavy"]


def test_predict_of_a_missing_file_answers_before_torch(tmp_path):
    started = _start(["predict", str(tmp_path / "missing.mp4")])
    assert started["code"] == 2 and started["heavy"] == [], started
    assert started["stderr"].strip() == f"error: {tmp_path / 'missing.mp4'}: no such file or folder"


@pytest.mark.parametrize("args", [["predict", "x.mp4", "--fps", "0"], ["predict"], ["eval", "--subset", "s4"],
                                  ["train", "--workers", "many"]])
def test_usage_errors_import_nothing_heavy(args):
    started = _start(args)
    assert started["code"] == 2 and started["heavy"] == [], started


def test_plot_of_a_missing_run_answers_before_torch_and_matplotlib(tmp_path):
    started = _start(["plot", str(tmp_path / "missing")])
    assert started["code"] == 1 and started["heavy"] == [], started
    assert started["stderr"].strip() == f"error: {tmp_path / 'missing'}: no such run folder"


def test_predict_of_an_empty_folder_answers_before_torch(tmp_path):
    started = _start(["predict", str(tmp_path)])
    assert started["code"] == 2 and started["heavy"] == [], started
    assert "no videos in this folder" in started["stderr"]


def test_info_reads_versions_from_metadata_and_imports_torch_only_for_devices():
    """`av2ts info` needs torch for what CUDA sees and model.ops for the kernel backend; the other versions come
    from the packages' metadata, so torchaudio is never imported."""
    from importlib.metadata import version

    started = _start(["info", "--json"])
    assert started["code"] == 0, started
    assert "torchaudio" not in started["heavy"] and "torch" in started["heavy"]
    report = json.loads(started["stdout"][:started["stdout"].rindex("\n{")])  # the report, then CHECK's line
    assert report["torchaudio"] == version("torchaudio") and report["timm"] == version("timm")
