"""Deformable attention: the C++ kernel against the pure-PyTorch oracle (forward, backward, gradcheck, bf16), the
first-use build into an empty cache, the fallback when no compiler is found, the backend switch, the CUDA source
under nvcc, and (where a GPU exists) the CUDA kernel.

The CPU kernel is built once per session, by two fresh processes started together on an empty cache folder
(``kernel_first_use`` in conftest.py: one builds, the other waits on the lock); the in-process tests load that
build (``cpp_kernel``). Checks that must not share this process's loaded kernels run in subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_FIRST_USE, run_python

from av2ts_cli.errors import KernelError, UsageError
from av2ts_cli.model import deform_attn
from av2ts_cli.model.deform_attn import ENV_VAR, ms_deform_attn, ms_deform_attn_torch

MISSING_COMPILER = "/nonexistent/bin/c++"


def make_inputs(shapes=((8, 4), (4, 8), (2, 2), (1, 1)), batch=2, queries=9, heads=3, dim=32, points=3,
                dtype=torch.float32, borders=False, seed=0):
    """Random inputs with levels of unequal sizes and locations in [-0.3, 1.3]. ``borders``: a third of the
    coordinates sit exactly on cell borders (x * w - 0.5 an integer from -1 to w, exact in binary because the
    sizes are powers of two), plus exact 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, dim, generator=g, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if borders:
        for level, (h, w) in enumerate(shapes):
            for axis, side in ((0, w), (1, h)):
                exact = torch.tensor([(k + 0.5) / side for k in range(-1, side + 1)] + [0.0, 1.0], dtype=torch.float64)
                target = locations[:, :, :, level, :, axis]
                pick = torch.rand(target.shape, generator=g) < 0.35
                choice = exact[torch.randint(len(exact), target.shape, generator=g)]
                target[pick] = choice[pick]
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=torch.float64)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32  # locations and weights
    return value.to(dtype), spatial_shapes, level_start, locations.to(accumulation), weights.to(accumulation)


@pytest.fixture
def forced_cpp(cpp_kernel, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpp")
    return cpp_kernel


# ---------------------------------------------------------------------------------------------- build and backends
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
    code = """
import json, os, torch
from av2ts_cli.errors import KernelError
from av2ts_cli.model import deform_attn as da
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
    monkeypatch.setattr(deform_attn, "load_kernel", no_kernel)
    inputs = make_inputs(dim=4)
    assert deform_attn.active_backend("cpu") == "torch"
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_torch(*inputs))


def test_forcing_cpp_runs_the_kernel(forced_cpp):
    value, *rest = make_inputs(dim=4)
    out = ms_deform_attn(value.requires_grad_(), *rest)
    assert type(out.grad_fn).__name__.startswith("_MSDeformAttnFunction")
    assert deform_attn.active_backend("cpu") == "cpp"


def test_bad_backend_choices(monkeypatch):
    inputs = make_inputs(dim=4)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(UsageError, match=ENV_VAR):
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
    assert (deform_attn.kernel_source_dir() / "ms_deform_attn_cuda.cu").is_file()
    # an installed wheel carries the sources in av2ts_cli/kernels (pyproject's force-include)
    installed = tmp_path / "site-packages" / "av2ts_cli"
    shutil.copytree(deform_attn.kernel_source_dir(), installed / "kernels")
    monkeypatch.setattr(deform_attn, "__file__", str(installed / "model" / "deform_attn.py"))
    assert deform_attn.kernel_source_dir() == installed / "kernels"
    monkeypatch.undo()
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path))
    assert deform_attn.build_root() == tmp_path / "kernels"
    monkeypatch.delenv("AV2TS_CACHE")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert deform_attn.build_root() == tmp_path / "ext" / "av2ts"


# ------------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dim", [32, 16, 64, 20, 5])  # two, one and four SIMD vectors, vector + tail, scalar only
@pytest.mark.parametrize("borders", [False, True])
def test_forward_matches_the_fallback(forced_cpp, dim, borders):
    inputs = make_inputs(dim=dim, borders=borders, seed=dim)
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_torch(*inputs), atol=1e-5, rtol=0)


def test_forward_with_far_away_and_nan_locations(forced_cpp):
    value, shapes, start, loc, weights = make_inputs(dim=8)
    loc[0, 0, 0, 0, 0] = torch.tensor([1e9, -1e9])
    loc[0, 1, 0, 0, 0] = torch.tensor([-5.0, 0.5])
    torch.testing.assert_close(ms_deform_attn(value, shapes, start, loc, weights),
                               ms_deform_attn_torch(value, shapes, start, loc, weights), atol=1e-5, rtol=0)
    loc[1, 0, 0, 0, 0] = float("nan")  # defined behaviour: that sample is outside the map (no crash, no garbage)
    out = ms_deform_attn(value, shapes, start, loc, weights)
    loc[1, 0, 0, 0, 0] = 10.0
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, start, loc, weights))


def assert_same_gradients(inputs, grad_output) -> None:
    """The kernel's gradients for value, sampling locations and attention weights are the fallback's."""
    grads = []
    for attention in (ms_deform_attn, ms_deform_attn_torch):
        leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        attention(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2]).backward(grad_output)
        grads.append([leaf.grad for leaf in leaves])
    for kernel_grad, oracle_grad in zip(*grads, strict=True):
        torch.testing.assert_close(kernel_grad, oracle_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dim", [32, 20])
@pytest.mark.parametrize("borders", [False, True])
def test_backward_matches_the_fallback(forced_cpp, dim, borders):
    inputs = make_inputs(dim=dim, borders=borders, seed=10 + dim)
    grad_output = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * dim)
    assert_same_gradients(inputs, grad_output)


@pytest.mark.parametrize(("batch", "threads"), [(1, 2), (3, 2), (2, 3)])
def test_backward_with_frames_shared_between_threads(forced_cpp, batch, threads):
    # a frame whose queries are split between threads gets grad_value from each (summed private buffers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(batch=batch, queries=37, dim=16, seed=batch)
        grads = []
        for attention in (ms_deform_attn, ms_deform_attn_torch):
            value = inputs[0].clone().requires_grad_()
            attention(value, *inputs[1:]).square().sum().backward()
            grads.append(value.grad)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dim", [3, 8])  # scalar path; one float64 SIMD vector
def test_gradcheck_float64(forced_cpp, dim):
    g = torch.Generator().manual_seed(dim)
    shapes = ((3, 4), (2, 2))
    value, spatial_shapes, start, loc, weights = make_inputs(shapes, batch=2, queries=3, heads=2, dim=dim, points=2,
                                                            dtype=torch.float64, seed=dim)
    # pixel coordinates from -1.9 to size + 0.9 whose fractional part stays 0.1 away from cell borders, where the
    # bilinear map is not differentiable
    for level, (h, w) in enumerate(shapes):
        for axis, side in ((0, w), (1, h)):
            target = loc[:, :, :, level, :, axis]
            pixel = torch.randint(-2, side + 1, target.shape, generator=g) + 0.1 + 0.8 * torch.rand(target.shape,
                                                                                                  generator=g)
            target.copy_((pixel + 0.5) / side)

    def attention(v, sampling, w):
        return ms_deform_attn(v, spatial_shapes, start, sampling, w)

    assert torch.autograd.gradcheck(attention, (value.requires_grad_(), loc.requires_grad_(),
                                                weights.requires_grad_()))


def test_bfloat16_forward_is_close_to_float32(forced_cpp):
    value, shapes, start, loc, weights = make_inputs(dim=32, borders=True)
    value = value.bfloat16()
    out = ms_deform_attn(value, shapes, start, loc, weights)
    assert out.dtype == torch.bfloat16
    reference = ms_deform_attn(value.float(), shapes, start, loc, weights)
    # fp32 accumulation: only the output's rounding to bf16 (8 bits of mantissa) separates them
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=8e-3)
    grad = torch.autograd.grad(ms_deform_attn(value.requires_grad_(), shapes, start, loc, weights).sum(), value)[0]
    assert grad.dtype == torch.bfloat16


def test_half_values_on_cpu_are_computed_in_float32(forced_cpp):
    value, shapes, start, loc, weights = make_inputs(dim=16)
    out = ms_deform_attn(value.half(), shapes, start, loc, weights)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ms_deform_attn_torch(value.half().float(), shapes, start, loc, weights),
                               atol=2e-3, rtol=2e-3)


def test_empty_batch(forced_cpp):
    value, shapes, start, loc, weights = make_inputs(batch=0, dim=8)
    assert ms_deform_attn(value, shapes, start, loc, weights).shape == (0, 9, 24)


# ---------------------------------------------------------------------------------------------------------- CUDA
def _nvcc() -> str | None:
    home = deform_attn.find_cuda_home()
    return str(home / "bin" / "nvcc") if home else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the flags torch's JIT build passes to nvcc

    source = deform_attn.kernel_source_dir() / "ms_deform_attn_cuda.cu"
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


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("borders", [False, True])
def test_cuda_kernel_matches_the_fallback(monkeypatch, borders):
    monkeypatch.setenv(ENV_VAR, "cuda")
    inputs = [t.cuda() for t in make_inputs(dim=32, borders=borders)]
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_torch(*inputs), atol=1e-5, rtol=0)
    grad_output = torch.randn_like(ms_deform_attn_torch(*inputs))
    assert_same_gradients(inputs, grad_output)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dim", [32, 20, 64])  # shuffle-reduced heads, atomics per channel, two warps per head
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_are_close_to_float32(monkeypatch, dim, dtype):
    monkeypatch.setenv(ENV_VAR, "cuda")
    value, shapes, start, loc, weights = (t.cuda() for t in make_inputs(dim=dim))
    out = ms_deform_attn(value.to(dtype), shapes, start, loc, weights)
    assert out.dtype == dtype
    reference = ms_deform_attn_torch(value.to(dtype).float(), shapes, start, loc, weights)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=1e-2)
    leaves = [value.to(dtype).requires_grad_(), loc.clone().requires_grad_(), weights.clone().requires_grad_()]
    ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2]).float().square().sum().backward()
    oracle = [value.to(dtype).float().requires_grad_(), loc.clone().requires_grad_(), weights.clone().requires_grad_()]
    ms_deform_attn_torch(oracle[0], shapes, start, oracle[1], oracle[2]).square().sum().backward()
    for kernel_leaf, oracle_leaf in zip(leaves, oracle, strict=True):
        torch.testing.assert_close(kernel_leaf.grad.float(), oracle_leaf.grad, atol=5e-2, rtol=2e-2)
