"""Deformable attention, the op (``av2ts_cli.model.ops.deform_attn``): the C++ kernel against the pure-PyTorch
oracle (forward, backward, gradcheck, bf16, half) and, where a GPU exists, the CUDA kernel. The kernel comes from
the session's build (``cpp_kernel`` in conftest.py); the build itself is tested in tests/test_model_ops_build.py.
"""

from __future__ import annotations

import pytest
import torch
from _deform_attn_inputs import make_inputs

from av2ts_cli.model.ops import ENV_VAR, ms_deform_attn, ms_deform_attn_torch


@pytest.fixture
def forced_cpp(cpp_kernel, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpp")
    return cpp_kernel


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


@pytest.mark.parametrize("dim", [32, 16, 64, 20, 5])  # as above: each blend path with its own store
def test_bfloat16_forward_is_the_float32_one_rounded(forced_cpp, dim):
    """fp32 accumulation over the widened bf16 values, then one rounding (to nearest, ties to even): bit for bit
    PyTorch's own float -> bf16 conversion of the fp32 kernel's output, NaN where it is NaN (the bits of a NaN may
    differ: the kernel writes c10's 0x7FC0, ``Tensor.bfloat16`` keeps the sign)."""
    value, shapes, start, loc, weights = make_inputs(dim=dim, borders=True, seed=dim)
    value = (value * 1e3).bfloat16()  # large values: a truncating or off-by-one rounding shows in the low bits
    value.view(-1)[::97] = float("nan")
    out = ms_deform_attn(value, shapes, start, loc, weights)
    assert out.dtype == torch.bfloat16
    reference = ms_deform_attn(value.float(), shapes, start, loc, weights).bfloat16()
    nan = reference.isnan()
    assert nan.any() and torch.equal(out.isnan(), nan)
    assert torch.equal(out.view(torch.int16)[~nan], reference.view(torch.int16)[~nan])


def test_bfloat16_backward_gives_bfloat16_gradients(forced_cpp):
    value, shapes, start, loc, weights = make_inputs(dim=32, borders=True)
    value = value.bfloat16()
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
