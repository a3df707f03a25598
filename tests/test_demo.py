"""The bundled demo (assets/): the clip, its known masks and the demo model, and the README's first command,
`av2ts predict assets/demo.mp4 --overlay out.mp4`, run as a newcomer runs it (a real subprocess, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from av2ts_cli import media
from av2ts_cli.data.images import read_mask
from av2ts_cli.data.layout import MASK_BINARY
from av2ts_cli.data.synth import clip_masks_folder
from av2ts_cli.metrics import frame_iou
from av2ts_cli.weights.registry import DEMO_MODEL_DIR

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_CLIP = ASSETS / "demo.mp4"


def test_the_demo_assets_are_small_and_complete():
    info = media.probe(DEMO_CLIP)
    assert DEMO_CLIP.stat().st_size <= 2 * 2**20 and 10 <= info.duration <= 20 and info.has_audio
    masks = sorted(clip_masks_folder(DEMO_CLIP).glob("*.png"))
    assert len(masks) == int(info.duration)  # one known mask per second, at k + 15/16 s
    assert DEMO_MODEL_DIR == ASSETS / "demo-model"
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) <= 25 * 2**20
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["preset"] == "av2ts-tiny" and config["trained_on"]["subset"] == "s4"


@pytest.mark.slow
def test_first_command_segments_the_demo_clip_with_its_sound(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).with_name("av2ts")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "av2ts_cli"]
    result = subprocess.run([*command, "predict", str(DEMO_CLIP), "--overlay", "out.mp4"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "bundled demo model" in result.stderr and "Results saved to" in result.stderr

    predicted = sorted((tmp_path / "runs" / "predict" / "exp" / "demo" / "masks").glob("*.png"))
    known = sorted(clip_masks_folder(DEMO_CLIP).glob("*.png"))
    assert [p.name for p in predicted] == [p.name for p in known]
    prob = torch.from_numpy(np.stack([read_mask(p, MASK_BINARY) for p in predicted])).float()
    gt = torch.from_numpy(np.stack([read_mask(p, MASK_BINARY) for p in known]))
    miou = float(frame_iou(prob, gt).mean())
    assert miou >= 0.8, miou

    out, clip = media.probe(tmp_path / "out.mp4"), media.probe(DEMO_CLIP)
    assert out.has_audio and abs(out.duration - clip.duration) <= 1 / clip.fps + 1e-6
    original, overlaid = media.decode_audio(DEMO_CLIP), media.decode_audio(tmp_path / "out.mp4")
    n = min(len(original), len(overlaid))
    assert abs(len(original) - len(overlaid)) <= 16000 / clip.fps + 1024
    assert np.corrcoef(original[:n], overlaid[:n])[0, 1] > 0.99
