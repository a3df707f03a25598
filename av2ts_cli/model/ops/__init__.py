"""Multi-scale deformable attention: the op (``deform_attn``) and the choice and JIT build of its kernels
(``build``)."""

from __future__ import annotations

from av2ts_cli.model.ops.build import (
    ENV_VAR,
    KernelError,
    KernelUnavailable,
    active_backend,
    build_root,
    find_cuda_home,
    kernel_setup_seconds,
    kernel_source_dir,
    load_kernel,
    requested_backend,
)
from av2ts_cli.model.ops.deform_attn import ms_deform_attn, ms_deform_attn_torch

__all__ = ["ENV_VAR", "KernelError", "KernelUnavailable", "active_backend", "build_root", "find_cuda_home",
           "kernel_setup_seconds", "kernel_source_dir", "load_kernel", "ms_deform_attn", "ms_deform_attn_torch",
           "requested_backend"]
