"""Multi-scale deformable attention (Deformable-DETR semantics): compiled kernels and a pure-PyTorch fallback.

Backends, chosen per call from the tensors' device and ``AV2TS_DEFORM_ATTN=auto|cpp|cuda|torch``:

- ``cpp``: ``kernels/ms_deform_attn_cpu.cpp`` for CPU tensors (float32, float64, bfloat16 values);
- ``cuda``: ``kernels/ms_deform_attn_cuda.cu`` for CUDA tensors (float32, float16, bfloat16 values);
- ``torch``: ``ms_deform_attn_torch``, the pure-PyTorch fallback and the test oracle.

``auto`` (the default) takes the kernel of the tensors' device and falls back to PyTorch, with one warning, only
when the kernel cannot be built (no compiler, no ninja, no CUDA toolkit). A forced ``cpp`` or ``cuda`` that cannot
be built is a ``KernelError``. An error raised by a built kernel always propagates: Mask2Former-derived code wraps
the call in a bare ``except:`` and silently runs 15x slower.

The kernels compile on first use with ``torch.utils.cpp_extension.load`` into ``build_root()``, in a folder whose
name hashes everything that makes a build specific (torch and CUDA versions, sources, flags, CPU for
``-march=native``, GPU architectures); a file lock keeps parallel first runs from building twice. A finished build
is loaded again without a compiler. Sampling locations, attention weights and accumulation stay float32 whatever
the value dtype (bf16 locations would be off by a quarter pixel at 64 px).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from av2ts_cli.errors import KernelError, UsageError

ENV_VAR = "AV2TS_DEFORM_ATTN"
BACKENDS = ("auto", "cpp", "cuda", "torch")
CPU_SOURCES = ("ms_deform_attn.h", "ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCES = (*CPU_SOURCES, "ms_deform_attn_cuda.cu")
KERNEL_DTYPES = {"cpp": (torch.float32, torch.float64, torch.bfloat16),
                 "cuda": (torch.float32, torch.float16, torch.bfloat16)}
_MARKER = "av2ts-build.json"  # written once a build has loaded; its presence means "reuse, no compiler needed"


# ----------------------------------------------------------------------------------------------------- the op
def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (the fallback and the test oracle).

    value: [N, S, H, D] with S = sum(h_l * w_l); spatial_shapes: [L, 2] (h, w); level_start_index: [L];
    sampling_locations: [N, Q, H, L, P, 2] as (x, y) in [0, 1]; attention_weights: [N, Q, H, L, P].
    Returns [N, Q, H*D] in value's dtype. Bilinear, zero padding, align_corners=False; half-precision values are
    sampled in float32, like the kernels do.
    """
    n, _, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
    # [N, S, H, D] -> [N*H, D, S]: each level is then a [N*H, D, h, w] view for grid_sample
    planes = value.to(dtype).permute(0, 2, 3, 1).reshape(n * heads, dim, -1)
    # level-major, so each level's grid and weights are contiguous: [L, N*H, Q, P, 2] and [L, N*H, Q, P, 1]
    grids = (2 * sampling_locations.to(dtype) - 1).permute(3, 0, 2, 1, 4, 5).reshape(levels, n * heads, q, points, 2)
    weights = attention_weights.to(dtype).permute(3, 0, 2, 1, 4).reshape(levels, n * heads, q, points, 1)
    out = None
    for level, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist(), strict=True)):
        plane = planes[:, :, start:start + h * w].view(n * heads, dim, h, w)
        sampled = F.grid_sample(plane, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False)
        term = torch.matmul(sampled.transpose(1, 2), weights[level])  # [N*H, Q, D, 1]: weighted sum over points
        out = term if out is None else out + term
    return out.view(n, heads, q, dim).transpose(1, 2).reshape(n, q, heads * dim).to(value.dtype)


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.ops = ops
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return ops.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.ops.backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous())
        return None, grad_value, None, None, grad_locations, grad_weights


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention through the active backend (shapes: see ``ms_deform_attn_torch``)."""
    backend, ops = _backend_for(value.device.type)
    if backend == "torch" or (backend == "cuda" and value.dtype == torch.float64):  # no fp64 CUDA kernel
        return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    if value.dtype not in KERNEL_DTYPES[backend]:  # e.g. float16 on CPU: compute in float32
        value = value.float()
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.long)
    level_start_index = level_start_index.to(device=value.device, dtype=torch.long)
    sampling_locations, attention_weights = sampling_locations.to(acc), attention_weights.to(acc)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        out = _MSDeformAttnFunction.apply(ops, *args)
    else:
        out = ops.forward(*args)
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------- backend choice
_lock = threading.RLock()
_loaded: dict[str, object] = {}  # "cpp" / "cuda" -> the torch.ops namespace of the loaded build
_failed: dict[str, str] = {}  # "cpp" / "cuda" -> why it cannot be built (already warned about)


class KernelUnavailable(Exception):
    """The kernel cannot be built or loaded here (a missing build, not a failing kernel)."""


def requested_backend() -> str:
    value = (os.environ.get(ENV_VAR) or "auto").strip().lower()
    if value not in BACKENDS:
        raise UsageError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _native_backend(device_type: str) -> str | None:
    return {"cpu": "cpp", "cuda": "cuda"}.get(device_type)


def _backend_for(device_type: str) -> tuple[str, object | None]:
    requested = requested_backend()
    if requested == "torch":
        return "torch", None
    native = _native_backend(device_type)
    if requested != "auto" and requested != native:
        raise KernelError(f"{ENV_VAR}={requested}, but the tensors are on {device_type}: the {requested} kernel "
                          f"takes {'CUDA' if requested == 'cuda' else 'CPU'} tensors")
    if native is None:  # e.g. mps: no kernel, nothing to warn about
        return "torch", None
    try:
        return native, load_kernel(native)
    except KernelUnavailable as err:
        if requested == "auto":
            return "torch", None
        raise KernelError(f"{ENV_VAR}={requested}: the {native} kernel cannot be built: {err}") from None


def active_backend(device: str | torch.device | None = None) -> str:
    """The backend a call on ``device`` (default: cuda when available, else cpu) would take, without building."""
    requested = requested_backend()
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    native = _native_backend(device_type)
    if requested == "torch" or native is None:
        return "torch"
    if requested != "auto":
        return requested
    if native in _loaded:
        return native
    if native in _failed:
        return "torch"
    try:
        ready = (_build_dir(native) / _MARKER).is_file() or _missing_toolchain(native) is None
    except KernelUnavailable:  # no kernel sources
        return "torch"
    return native if ready else "torch"


def load_kernel(backend: str):
    """The ``torch.ops`` namespace of the ``cpp`` or ``cuda`` build, built on first use; raises KernelUnavailable."""
    with _lock:
        if backend in _loaded:
            return _loaded[backend]
        if backend in _failed:
            raise KernelUnavailable(_failed[backend])
        try:
            ops = _load_or_build(backend)
        except KernelUnavailable as err:
            _failed[backend] = str(err)
            if requested_backend() == "auto":
                from av2ts_cli.console import warn

                warn(f"deformable attention runs on the slow pure-PyTorch fallback: the {backend} kernel cannot be "
                     f"built ({err}). Install a C++ compiler{' and the CUDA toolkit' if backend == 'cuda' else ''} "
                     f"or set {ENV_VAR}=torch to silence this warning.")
            raise
        _loaded[backend] = ops
        return ops


# ------------------------------------------------------------------------------------------------------- build
def kernel_source_dir() -> Path:
    """kernels/ inside the installed package (wheel), else in the source tree."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "ms_deform_attn.cpp").is_file():
            return candidate
    raise KernelUnavailable(f"kernel sources not found in {package / 'kernels'} or {package.parent / 'kernels'}")


def build_root() -> Path:
    """The folder that holds the kernel builds: $AV2TS_CACHE/kernels, else $TORCH_EXTENSIONS_DIR/av2ts, else
    ~/.cache/av2ts/kernels."""
    from av2ts_cli.environment import default_cache_dir

    if not os.environ.get("AV2TS_CACHE") and os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "av2ts"
    return default_cache_dir() / "kernels"


def find_cuda_home() -> Path | None:
    """A CUDA toolkit folder with bin/nvcc and lib64/libcudart.so: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda*, or
    the folder of nvcc on PATH (which may be a wrapper script outside the toolkit, hence the checks)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in filter(None, candidates):
        home = Path(candidate)
        if (home / "bin" / "nvcc").is_file() and any((home / lib / "libcudart.so").exists()
                                                      for lib in ("lib64", "lib")):
            return home
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _ninja_available() -> bool:
    if shutil.which("ninja"):
        return True
    try:  # the ninja wheel of an environment that is not activated: put its binary on PATH for the build
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return shutil.which("ninja") is not None
    except ImportError:
        return False


def _missing_toolchain(backend: str) -> str | None:
    """Why ``backend`` cannot be compiled here, or None."""
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler ({_compiler()!r} not found; set CXX)"
    if not _ninja_available():
        return "ninja not found (pip install ninja)"
    if backend == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if find_cuda_home() is None:
            return "no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc and lib64/libcudart.so)"
    return None


def _flags(backend: str) -> dict:
    cflags, ldflags = ["-O3"], []
    if "OpenMP" in torch.__config__.parallel_info():  # at::parallel_for is inline OpenMP code in this torch
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        cflags.append("-march=native")
    elif machine in ("aarch64", "arm64"):
        cflags.append("-mcpu=native")
    flags = {"cflags": cflags, "ldflags": ldflags}
    if backend == "cuda":
        flags["cuda_cflags"] = ["-O3"]
        flags["cuda_archs"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(sorted({
            "{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}))
    return flags


def _cpu_identity() -> str:
    """What -march=native depends on."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build_name(backend: str) -> str:
    sources = CUDA_SOURCES if backend == "cuda" else CPU_SOURCES
    digest = hashlib.sha256()
    directory = kernel_source_dir()
    for name in sources:
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    identity = {"backend": backend, "torch": torch.__version__, "cuda": torch.version.cuda,
                "python": sys.implementation.cache_tag, "platform": sys.platform, "machine": platform.machine(),
                "cpu": _cpu_identity(), **_flags(backend)}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return f"av2ts_msda_{backend}_{digest.hexdigest()[:16]}"


def _build_dir(backend: str) -> Path:
    return build_root() / _build_name(backend)


def _load_or_build(backend: str):
    name = _build_name(backend)
    build_dir = build_root() / name
    marker = build_dir / _MARKER
    if not marker.is_file():
        missing = _missing_toolchain(backend)
        if missing:
            raise KernelUnavailable(missing)
        build_dir.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(build_root() / f"{name}.lock"), timeout=900):
                if not marker.is_file():  # another process may have built it while we waited
                    _build(backend, name, build_dir)
        except Timeout:
            raise KernelUnavailable(f"another process holds {build_root() / (name + '.lock')} for 15 minutes") from None
    try:
        library = build_dir / json.loads(marker.read_text())["library"]
        torch.ops.load_library(str(library))
    except (OSError, ValueError, KeyError) as err:
        raise KernelUnavailable(f"cannot load the build in {build_dir} ({err}); delete that folder to rebuild it"
                                ) from None
    return getattr(torch.ops, name)


def _build(backend: str, name: str, build_dir: Path) -> None:
    from av2ts_cli.console import info

    # torch guesses CUDA_HOME from nvcc's folder on PATH, which can be a wrapper outside the toolkit (then the link
    # fails on -lcudart); name the toolkit before torch looks
    if not os.environ.get("CUDA_HOME") and find_cuda_home() is not None:
        os.environ["CUDA_HOME"] = str(find_cuda_home())
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)  # "No CUDA runtime is found" on GPU-less machines: noise here
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_extension_log.setLevel(level)

    if backend == "cuda":
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    flags = _flags(backend)
    directory = kernel_source_dir()
    sources = [str(directory / s) for s in (CUDA_SOURCES if backend == "cuda" else CPU_SOURCES) if s[-2:] != ".h"]
    info(f"compiling the {backend} deformable-attention kernel (first use only, 10-60 s)")
    previous_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if backend == "cuda" and flags["cuda_archs"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = flags["cuda_archs"]
    try:
        library = cpp_extension.load(
            name=name, sources=sources, build_directory=str(build_dir), extra_cflags=flags["cflags"],
            extra_ldflags=flags["ldflags"], extra_cuda_cflags=flags.get("cuda_cflags"),
            extra_include_paths=[str(directory)], is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        log = build_dir / "build-error.log"
        log.write_text(f"{err}\n{getattr(err, 'output', '') or ''}")
        lines = [line for line in str(err).splitlines() if "error" in line.lower()] or str(err).splitlines()
        raise KernelUnavailable(f"the build failed: {lines[0].strip() if lines else type(err).__name__} "
                           f"(log: {log})") from None
    finally:
        if backend == "cuda":
            if previous_arch_list is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch_list
    tmp = build_dir / f".{_MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps({"library": Path(library).name, "torch": torch.__version__}))
    os.replace(tmp, build_dir / _MARKER)
