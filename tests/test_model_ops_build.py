"""Deformable-attention backends and their build (``av2ts_cli.model.ops.build``): the first-use build into an
empty cache, reuse without a compiler, the fallback with one warning when no compiler is found, the backend switch,
the kernel source and cache folders, and the CUDA source under nvcc.

The CPU kernel is built once per session, by two fresh processes started together on an empty cache folder
(``kernel_first_use`` in conftest.py: one builds, the other waits on the lock); the in-process tests load that
build (``cpp_kernel``). Checks that must not share this process's loaded kernels run in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _deform_attn_inputs import make_inputs
from conftest import KERNEL_FIRST_USE, run_python

from av2ts_cli.model.ops import ENV_VAR, KernelError, build, ms_deform_attn, ms_deform_attn_torch

MISSING_COMPILER = "/nonexistent/bin/c++"


def test_first_use_builds_into_an_empty_cache_folder_once_for_parallel_runs(kernel_first_use):
    cache, results = kernel_first_use
    for result in results:
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["backend"] == "cpp"
        assert report["root"] == str(cache / "kernels")
        assert report["grad_fn"].startswith("_MSDeformAttnFunction")  # the kernel ran, not the fallback
        assert report["diff"] < 1e-5
        assert "warning" not in result.stderr
    builds = [p for p in (cache / "kernels").iterdir() if p.is_dir()]
    assert len(builds) == 1 and (builds[0] / "av2ts-build.json").is_file()
    # the two processes started together: one compiled, the other waited on the lock and loaded that build
    assert sum(r.stderr.count("compiling the cpp deformable-attention kernel") for r in results) == 1


def test_a_finished_build_loads_without_a_compiler(kernel_first_use):
    cache, _ = kernel_first_use
    result = run_python(KERNEL_FIRST_USE, AV2TS_CACHE=cache, CXX=MISSING_COMPILER, **{ENV_VAR: None})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "cpp" and report["grad_fn"].startswith("_MSDeformAttnFunction")
    assert "compiling" not in result.stderr and "warning" not in result.stderr


def test_hidden_compiler_falls_back_with_one_warning_and_forcing_cpp_is_an_error(tmp_path):
    # the CLI's display of the network's warnings, and every warning shown (not once per place): "one warning" is
    # then a count of the warnings issued
    code = """
import json, os, torch, warnings
from av2ts_cli.console import show_library_messages
from av2ts_cli.model import ops as da
from av2ts_cli.model.ops import KernelError
show_library_messages()
warnings.simplefilter("always")
shapes = torch.tensor([[4, 3], [2, 2]]); start = torch.tensor([0, 12])
value = torch.randn(2, 16, 2, 8, requires_grad=True)
loc = torch.rand(2, 5, 2, 2, 2, 2); weights = torch.rand(2, 5, 2, 2, 2)
outs = [da.ms_deform_attn(value, shapes, start, loc, weights) for _ in range(3)]
outs[0].sum().backward()
same = all(torch.equal(o, da.ms_deform_attn_torch(value, shapes, start, loc, weights)) for o in outs)
backend = da.active_backend("cpu")
os.environ["AV2TS_DEFORM_ATTN"] = "cpp"
try:
    da.ms_deform_attn(value, shapes, start, loc, weights)
    forced = "no error"
except KernelError as err:
    forced = str(err)
print(json.dumps({"same": same, "backend": backend, "forced": forced}))
"""
    result = run_python(code, AV2TS_CACHE=tmp_path, CXX=MISSING_COMPILER, **{ENV_VAR: None})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same"] and report["backend"] == "torch"
    assert result.stderr.count("warning:") == 1
    assert "no C++ compiler" in result.stderr and "pure-PyTorch fallback" in result.stderr
    assert "cannot be built" in report["forced"] and "no C++ compiler" in report["forced"]
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_forcing_torch_never_touches_the_kernel(monkeypatch):
    def no_kernel(backend):
        raise AssertionError("the kernel was loaded")

    monkeypatch.setenv(ENV_VAR, "torch")
    monkeypatch.setattr(build, "load_kernel", no_kernel)
    inputs = make_inputs(dim=4)
    assert build.active_backend("cpu") == "torch"
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_torch(*inputs))


def test_forcing_cpp_runs_the_kernel(cpp_kernel, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpp")
    value, *rest = make_inputs(dim=4)
    out = ms_deform_attn(value.requires_grad_(), *rest)
    assert type(out.grad_fn).__name__.startswith("_MSDeformAttnFunction")
    assert build.active_backend("cpu") == "cpp"


def test_the_fallback_warning_is_a_python_warning(tmp_path, monkeypatch):
    """The network reports through ``warnings`` (it cannot import the CLI's console): a fresh process state (no
    kernel loaded or failed yet), no compiler, an empty cache."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failed", {})
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", MISSING_COMPILER)
    monkeypatch.delenv(ENV_VAR, raising=False)
    inputs = make_inputs(dim=4)
    with pytest.warns(UserWarning, match="pure-PyTorch fallback: the cpp kernel cannot be built") as caught:
        out = ms_deform_attn(*inputs)
    assert len(caught) == 1 and torch.equal(out, ms_deform_attn_torch(*inputs))


def test_an_unwritable_kernel_cache_falls_back_with_one_warning(tmp_path, monkeypatch):
    """A read-only cache (no build there yet): the pure-PyTorch fallback serves with one warning naming the
    folder, and ``active_backend`` (what ``av2ts info`` reports) says torch, not cpp."""
    if os.geteuid() == 0:  # root writes through any mode bits: make the cache a file's child instead
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        cache = blocker / "cache"
    else:
        cache = tmp_path / "cache"
        cache.mkdir()
        cache.chmod(0o500)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failed", {})
    monkeypatch.setattr(build, "_writable", lambda folder: False)  # what the mode bits say to a user who is not root
    monkeypatch.setenv("AV2TS_CACHE", str(cache))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert build.active_backend("cpu") == "torch"
    inputs = make_inputs(dim=4)
    with pytest.warns(UserWarning, match="cannot be written") as caught:
        out = ms_deform_attn(*inputs)
    assert len(caught) == 1 and torch.equal(out, ms_deform_attn_torch(*inputs))


def test_bad_backend_choices(monkeypatch):
    inputs = make_inputs(dim=4)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        ms_deform_attn(*inputs)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(KernelError, match="CUDA tensors"):
        ms_deform_attn(*inputs)


def test_a_failing_kernel_is_never_hidden(cpp_kernel, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    value, shapes, start, loc, weights = make_inputs(dim=4)
    with pytest.raises(RuntimeError, match="ms_deform_attn: level 0"):
        ms_deform_attn(value, shapes, start + 1, loc, weights)  # level starts that do not match the shapes


def test_kernel_sources_and_build_root(monkeypatch, tmp_path):
    assert (build.kernel_source_dir() / "ms_deform_attn_cuda.cu").is_file()
    # an installed wheel carries the sources in av2ts_cli/kernels (pyproject's force-include)
    installed = tmp_path / "site-packages" / "av2ts_cli"
    shutil.copytree(build.kernel_source_dir(), installed / "kernels")
    monkeypatch.setattr(build, "__file__", str(installed / "model" / "ops" / "build.py"))
    assert build.kernel_source_dir() == installed / "kernels"
    monkeypatch.undo()
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path))
    assert build.build_root() == tmp_path / "kernels"
    monkeypatch.delenv("AV2TS_CACHE")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build.build_root() == tmp_path / "ext" / "av2ts"
    # without either, the app's cache root (config.cache_root, $XDG_CACHE_HOME/av2ts), which `av2ts info` reports
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.build_root() == tmp_path / "xdg" / "av2ts" / "kernels"


# ---------------------------------------------------------------------------------------------------------- CUDA
def _nvcc() -> str | None:
    home = build.find_cuda_home()
    return str(home / "bin" / "nvcc") if home else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the flags torch's JIT build passes to nvcc

    source = build.kernel_source_dir() / "ms_deform_attn_cuda.cu"
    command = [_nvcc(), "-c", "-O3", "-std=c++17", *COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               str(source), "-o", str(tmp_path / "ms_deform_attn_cuda.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    cuobjdump = Path(_nvcc()).parent / "cuobjdump"
    if cuobjdump.is_file():  # both architectures are in the object
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(tmp_path / "ms_deform_attn_cuda.o")],
                                 capture_output=True, text=True)
        assert "sm_80" in listing.stdout and "sm_90" in listing.stdout


def test_the_cli_shows_backend_errors_in_one_line(monkeypatch):
    """A KernelError (a forced kernel that cannot serve the call) is a runtime failure at the CLI (exit 1); an
    unknown backend name is a ValueError of the network, a usage error there (exit 2)."""
    import typer
    from typer.testing import CliRunner

    from av2ts_cli import cli

    inputs = make_inputs(dim=4)
    app = typer.Typer()

    @app.command()
    @cli._reported
    def attend() -> None:
        ms_deform_attn(*inputs)

    cli._state["debug"] = False
    monkeypatch.setenv(ENV_VAR, "cuda")
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: AV2TS_DEFORM_ATTN=cuda, but the tensors are on cpu: the cuda kernel "
                                     "takes CUDA tensors")
    monkeypatch.setenv(ENV_VAR, "fast")
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert result.output.strip() == "error: AV2TS_DEFORM_ATTN='fast': expected one of auto, cpp, cuda, torch"

