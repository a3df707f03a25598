"""The CLI shell: version, help, the one-line error contract and exit codes, `av2ts info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from av2ts_cli import __version__, cli
from av2ts_cli.errors import EXIT_USAGE, MediaError, UsageError

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"av2ts {__version__}"
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("predict", "overlay", "train", "eval", "data", "bench", "info", "convert"):
        assert command in result.output


SUBCOMMANDS = ["predict", "overlay", "train", "eval", "info", "convert", "maskiges", "data synth", "data check",
               "bench media", "bench kernels", "bench model", "bench predict", "bench train", "bench maskiges"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    result = runner.invoke(cli.app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


def _app_raising(error: Exception) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @cli._reported
    def boom() -> None:
        raise error

    return app


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (MediaError("my clip.mp4", "no video stream\n(ffmpeg said more)"), 1, "my clip.mp4: no video stream (ffmpeg"),
        (UsageError("--half needs a CUDA device"), EXIT_USAGE, "--half needs a CUDA device"),
        (ValueError("unexpected"), 1, "ValueError: unexpected"),
        (MediaError("clip [/x] [b].mp4", "bad [red]"), 1, "clip [/x] [b].mp4: bad [red]"),  # not rich markup
    ],
)
def test_errors_become_one_line_and_exit_code(error, code, text):
    cli._state["debug"] = False
    result = runner.invoke(_app_raising(error), [])
    assert result.exit_code == code
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert text in lines[0] and "Traceback" not in result.output


def test_debug_shows_the_traceback():
    cli._state["debug"] = True
    try:
        result = runner.invoke(_app_raising(MediaError("x.mp4", "broken")), [])
    finally:
        cli._state["debug"] = False
    assert result.exit_code != 0
    assert isinstance(result.exception, MediaError)


def test_info_json_reports_the_environment():
    result = runner.invoke(cli.app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("av2ts", "python", "torch", "torchaudio", "timm", "cuda_available", "ffmpeg", "ffprobe",
                "deform_attn_backend", "huggingface_hub_cache", "torch_extensions"):
        assert key in report
    assert report["av2ts"] == __version__
    assert report["ffmpeg"] and "ffmpeg version" in report["ffmpeg_version"]
    choice = report["cpu_precision"]  # the CPU's measured default precision and its figures (processes.py)
    assert choice["precision"] in ("fp32", "bf16") and choice["figures"]["matmul_gflops"]["fp32"] > 0
    text = runner.invoke(cli.app, ["info"])
    assert text.exit_code == 0 and "cpu_precision" in text.output and "GFLOP/s" in text.output


def test_real_subprocess_entry_points():
    for argv in (["av2ts", "--version"], [sys.executable, "-m", "av2ts_cli", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == f"av2ts {__version__}"


def test_command_summaries_are_one_paragraph_lines():
    """rich help keeps the docstring's line breaks: a summary wrapped in the source shows broken in the help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cli))
    checked = 0
    for node in ast.walk(tree):
        doc = ast.get_docstring(node, clean=False) if isinstance(node, ast.FunctionDef) else None
        if doc and any(isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in
                       node.decorator_list):
            assert "\n" not in doc.split("\n\n")[0], node.name
            checked += 1
    assert checked >= len(SUBCOMMANDS)


def test_info_names_a_bad_backend_variable_and_still_reports(monkeypatch):
    monkeypatch.setenv("AV2TS_DEFORM_ATTN", "bogus")
    result = runner.invoke(cli.app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["deform_attn_backend"] == ("none: AV2TS_DEFORM_ATTN='bogus': expected one of "
                                             "auto, cpp, cuda, torch")
    assert report["env"]["AV2TS_DEFORM_ATTN"] == "bogus" and report["torch"]


def test_a_clip_too_large_for_the_memory_is_refused_before_any_work(tmp_path):
    cli._state["debug"] = False
    result = runner.invoke(cli.app, ["data", "clip", str(tmp_path / "big.mp4"), "--size", "100000"])
    assert result.exit_code == EXIT_USAGE
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --size 100000: a clip that large needs about 429153 MB, ")
    assert "are free; at most --size " in lines[0] and list(tmp_path.iterdir()) == []
