"""runs.py: numbered run folders, the --device and --precision choices; and the atomic JSON (files.write_json)
the runs write."""

from __future__ import annotations

import json

import pytest
import torch

from av2ts_cli.errors import UsageError
from av2ts_cli.files import write_json
from av2ts_cli.model import inference
from av2ts_cli.processes import resolve_device, resolve_precision
from av2ts_cli.runs import numbered_run_folder


def test_run_folders_are_numbered_and_never_reused(tmp_path):
    assert [numbered_run_folder(tmp_path / "runs").name for _ in range(3)] == ["exp", "exp2", "exp3"]
    (tmp_path / "runs" / "exp2").rmdir()
    assert numbered_run_folder(tmp_path / "runs").name == "exp2"  # the first free name
    assert numbered_run_folder(tmp_path / "runs", "eval").name == "eval"


def test_write_json_replaces_whole_files_only(tmp_path):
    path = write_json(tmp_path / "deep" / "summary.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # fails while writing: the old file stays, no temp file is left
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("native", [True, False])
def test_the_precision_choice_is_a_usage_error_or_a_warning(monkeypatch, capsys, native):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == ("bf16" if native else "fp32")
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="contradicts --precision fp32"):
        resolve_precision("fp32", cpu, half=True)
    capsys.readouterr()
    assert resolve_precision(None, cpu, half=True) == ("bf16" if native else "fp32")
    assert ("no native bf16" in capsys.readouterr().err) is not native  # the changed choice is said once
