"""The checkpoint format (av2ts_cli/checkpoints.py): a config.json that lies is refused by its field, before the
network is built; a consistent one still loads. The hf:// source is tested in test_hub.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_line, tiny_cfg
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.config import FAMILIES, PRESET_NAMES
from av2ts_cli.errors import CheckpointError
from av2ts_cli.model import build_model
from av2ts_cli.weights import checkpoint, resolve

runner = CliRunner()


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``root``."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- lying configs
@pytest.fixture(scope="module")
def siam_checkpoint(tmp_path_factory) -> Path:
    """A random av2ts-tiny S4 checkpoint with the Siam encoder. Read-only: copy it to change it."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return checkpoint.save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "tiny")


PRESETS = ", ".join(PRESET_NAMES)
# (what to change in config.json, the exact reason after "<folder>/config.json: ")
LIES = {
    "unknown preset": ({"model.preset": "av2ts-huge"},
                       f'"model.preset" is "av2ts-huge", not a preset of this av2ts ({PRESETS})'),
    "unknown family": ({"model.family": "yolo"}, f'"model.family" is "yolo", not one of {", ".join(FAMILIES)}'),
    "family vs preset": ({"model.family": "combo"},
                         '"model.family" is "combo" but "model.preset" "av2ts-tiny" is of the av2ts family'),
    "unknown subset": ({"model.subset": "s5"}, '"model.subset" is "s5", not one of s4, ms3, avss'),
    "s4 with 71 classes": ({"model.num_classes": 71},
                           '"model.num_classes" is 71 but "model.subset" "s4" has 2 classes (background and '
                           "sounding object)"),
    "not a count": ({"model.num_classes": "two"},
                    '"model.num_classes" is "two", not a class count (2 or more, background included)'),
    "top-level subset": ({"subset": "avss"}, '"subset" is "avss" but "model.subset" is "s4"'),
    "top-level input size": ({"input_size": 224}, '"input_size" is 224 but "model.input_size" is 128'),
    "class names": ({"classes": ["background", "dog", "cat"]}, '"classes" lists 3 names but "model.num_classes" is 2'),
    "class head": ({"model.subset": "avss", "subset": "avss", "model.num_classes": 71,
                    "classes": [f"c{i}" for i in range(71)]},
                   '"model.num_classes" is 71 but the class head in model.safetensors scores 2 classes '
                   "(decoder.class_embed.weight [3, 64]: the classes and the no-object logit)"),
    "width": ({"model.hidden_dim": 128},
              '"model.hidden_dim" is 128 but the tensors in model.safetensors are 64 wide '
              "(decoder.class_embed.weight [3, 64])"),
    "siam": ({"model.siam": False},
             '"model.siam" is false but the tensors in model.safetensors hold a Siam encoder (siam_backbone.*)'),
    "family vs tensors": ({"model.preset": "combo-tiny", "model.family": "combo", "preset": "combo-tiny"},
                          '"model.family" is "combo" but the tensors in model.safetensors are an AV2TS network\'s '
                          "(acoustic_attention.* temporal attention)"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_lying_config_is_refused_by_its_field(siam_checkpoint, tmp_path, case):
    changes, reason = LIES[case]
    folder = shutil.copytree(siam_checkpoint, tmp_path / "ckpt")
    doc = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (doc[section] if section else doc)[field] = value
    (folder / "config.json").write_text(json.dumps(doc))
    before = _listing(folder)
    cli._state["debug"] = False
    result = runner.invoke(cli.app, ["info", "--model", str(folder)])
    assert result.exit_code == 1, result.output
    assert one_line(result.output) == f"error: {folder / 'config.json'}: {reason}"
    assert _listing(folder) == before  # read only
    with pytest.raises(CheckpointError) as caught:  # the same through THE resolver
        resolve.resolve_model(str(folder))
    assert caught.value.message == f"{folder / 'config.json'}: {reason}"


def test_a_consistent_config_still_loads(siam_checkpoint):
    model, cfg, doc = resolve.resolve_model(str(siam_checkpoint))
    assert cfg.siam and cfg.num_classes == 2 and len(doc["classes"]) == 2 and not model.training
