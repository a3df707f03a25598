"""av2ts_cli/training/__init__.py: the public names load on first use; the recipe table loads without torch (the
CLI's help texts read it)."""

from __future__ import annotations

import subprocess
import sys

import av2ts_cli.training as training


def test_every_public_name_loads():
    for name in training.__all__:
        assert getattr(training, name) is not None, name
    assert training.train.__module__ == "av2ts_cli.training.trainer"


def test_the_recipes_and_the_cli_load_without_torch():
    code = ("import sys, av2ts_cli.training.recipes, av2ts_cli.cli; "
            "print(sorted(m for m in ('torch', 'av2ts_cli.training.trainer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
