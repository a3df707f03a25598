"""The built wheel (pyproject.toml): a non-editable install carries the kernel sources and the demo assets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_kernels_and_the_demo(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "-w",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("av2ts-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in ("ms_deform_attn.h", "ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp", "ms_deform_attn_cuda.cu"):
        assert f"av2ts_cli/kernels/{kernel}" in names  # found by deform_attn.kernel_source_dir() when installed
    for asset in ("demo-model/model.safetensors", "demo-model/config.json", "demo.mp4"):
        assert f"av2ts_cli/assets/{asset}" in names  # found by weights.DEMO_MODEL_DIR when installed
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "av2ts = av2ts_cli.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
