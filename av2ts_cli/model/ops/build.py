"""Backend choice and the JIT build of the deformable-attention kernels (the op itself: ``deform_attn.py``).

Backends, chosen per call from the tensors' device and ``AV2TS_DEFORM_ATTN=auto|cpp|cuda|torch``:

- ``cpp``: ``kernels/ms_deform_attn_cpu.cpp`` for CPU tensors (float32, float64, bfloat16 values);
- ``cuda``: ``kernels/ms_deform_attn_cuda.cu`` for CUDA tensors (float32, float16, bfloat16 values);
- ``torch``: ``ms_deform_attn_torch``, the pure-PyTorch fallback and the test oracle.

``auto`` (the default) takes the kernel of the tensors' device and falls back to PyTorch, with one warning
(``warnings.warn``; the CLI shows it as one line), only when the kernel cannot be built (no compiler, no ninja, no
CUDA toolkit). A forced ``cpp`` or ``cuda`` that cannot be built is a ``KernelError``; a backend name that is not
one of the four is a ``ValueError``. An error raised by a built kernel always propagates: Mask2Former-derived code
wraps the call in a bare ``except:`` and silently runs 15x slower.

The kernels compile on first use with ``torch.utils.cpp_extension.load`` into ``build_root()``, in a folder whose
name hashes everything that makes a build specific (torch and CUDA versions, sources, flags, CPU for
``-march=native``, GPU architectures); a file lock keeps parallel first runs from building twice. A finished build
is loaded again without a compiler. The notice "compiling ..." goes to the ``logging`` logger of this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import torch

from av2ts_cli.config import cache_root

ENV_VAR = "AV2TS_DEFORM_ATTN"
BACKENDS = ("auto", "cpp", "cuda", "torch")
CPU_SOURCES = ("ms_deform_attn.h", "ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCES = (*CPU_SOURCES, "ms_deform_attn_cuda.cu")
_MARKER = "av2ts-build.json"  # written once a build has loaded; its presence means "reuse, no compiler needed"
logger = logging.getLogger(__name__)  # the CLI shows its INFO lines (the "compiling" notice)


class KernelError(RuntimeError):
    """A kernel that was asked for and cannot run here: forced with AV2TS_DEFORM_ATTN but not buildable, or forced
    for the other device's tensors. Never replaced by the fallback."""


# ---------------------------------------------------------------------------------------------- backend choice
_lock = threading.RLock()
_loaded: dict[str, object] = {}  # "cpp" / "cuda" -> the torch.ops namespace of the loaded build
_failed: dict[str, str] = {}  # "cpp" / "cuda" -> why it cannot be built (already warned about)
_setup_seconds: dict[str, float] = {}  # "cpp" / "cuda" -> seconds its first load took here (a build, a lock wait)


class KernelUnavailable(Exception):
    """The kernel cannot be built or loaded here (a missing build, not a failing kernel)."""


def requested_backend() -> str:
    """The backend AV2TS_DEFORM_ATTN asks for (``auto`` when unset); ValueError for any other name."""
    value = (os.environ.get(ENV_VAR) or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _native_backend(device_type: str) -> str | None:
    return {"cpu": "cpp", "cuda": "cuda"}.get(device_type)


def backend_for(device_type: str) -> tuple[str, object | None]:
    """(backend, its torch.ops namespace or None for ``torch``) for a call on tensors of ``device_type``, building
    the kernel on first use; KernelError when a forced kernel cannot serve the call."""
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
        if (_build_dir(native) / _MARKER).is_file():
            return native
        ready = _missing_toolchain(native) is None and _writable(build_root())
    except KernelUnavailable:  # no kernel sources
        return "torch"
    return native if ready else "torch"


def _writable(folder: Path) -> bool:
    """Whether a build could be written under ``folder`` (its nearest existing parent can be written)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def load_kernel(backend: str):
    """The ``torch.ops`` namespace of the ``cpp`` or ``cuda`` build, built on first use; raises KernelUnavailable."""
    with _lock:
        if backend in _loaded:
            return _loaded[backend]
        if backend in _failed:
            raise KernelUnavailable(_failed[backend])
        started = time.perf_counter()
        try:
            ops = _load_or_build(backend)
        except KernelUnavailable as err:
            _failed[backend] = str(err)
            if requested_backend() == "auto":
                toolkit = " and the CUDA toolkit" if backend == "cuda" else ""
                warnings.warn(f"deformable attention runs on the slow pure-PyTorch fallback: the {backend} kernel "
                              f"cannot be built ({err}). Install a C++ compiler{toolkit} or set {ENV_VAR}=torch to "
                              "silence this warning.", stacklevel=2)
            raise
        finally:
            _setup_seconds[backend] = time.perf_counter() - started
        _loaded[backend] = ops
        return ops


def kernel_setup_seconds() -> float:
    """Seconds this process spent getting its kernels ready (building one on first use, waiting for another
    process's build, loading a finished one): a one-off that a timing of the network leaves out (``predict``'s
    ms/window takes the difference across a forward pass)."""
    with _lock:
        return sum(_setup_seconds.values())


# ------------------------------------------------------------------------------------------------------- build
def kernel_source_dir() -> Path:
    """kernels/ inside the installed package (wheel), else in the source tree."""
    package = Path(__file__).resolve().parents[2]  # av2ts_cli/model/ops/build.py -> av2ts_cli
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "ms_deform_attn.cpp").is_file():
            return candidate
    raise KernelUnavailable(f"kernel sources not found in {package / 'kernels'} or {package.parent / 'kernels'}")


def build_root() -> Path:
    """The folder that holds the kernel builds: $AV2TS_CACHE/kernels, else $TORCH_EXTENSIONS_DIR/av2ts, else
    $XDG_CACHE_HOME/av2ts/kernels (~/.cache/av2ts/kernels). ``av2ts info`` reports it from here."""
    if not os.environ.get("AV2TS_CACHE") and os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "av2ts"
    return cache_root() / "kernels"


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
    # the ninja wheel of an environment that is not activated: its binary is in that environment's scripts folder
    # (the folders the wheel's own ninja.BIN_DIR searches), which is not on PATH; put it there for the build
    folders = (sysconfig.get_path("scripts"), sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user")),
               os.path.dirname(sys.executable))
    for folder in folders:
        if shutil.which("ninja", path=folder):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return True
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


@contextlib.contextmanager
def _exclusive_lock(path: Path, timeout: float):
    """Hold an exclusive ``flock`` on ``path``, waiting up to ``timeout`` s (TimeoutError after that). The kernel
    drops the lock when its holder dies, so a build killed half-way never blocks the next run."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} is locked") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_or_build(backend: str):
    name = _build_name(backend)
    build_dir = build_root() / name
    marker = build_dir / _MARKER
    if not marker.is_file():
        missing = _missing_toolchain(backend)
        if missing:
            raise KernelUnavailable(missing)
        lock = build_root() / f"{name}.lock"
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            with _exclusive_lock(lock, timeout=900):
                if not marker.is_file():  # another process may have built it while we waited
                    started = time.perf_counter()
                    _build(backend, name, build_dir)
                    logger.info(f"compiled the {backend} deformable-attention kernel once: "
                                f"{time.perf_counter() - started:.0f} s (later runs reuse it)")
        except TimeoutError:
            raise KernelUnavailable(f"another process holds {lock} for 15 minutes") from None
        except OSError as err:  # a read-only cache, or no folder there: the fallback serves, load_kernel warns
            raise KernelUnavailable(f"the kernel cache {build_root()} cannot be written ({err.strerror}); set "
                                    "AV2TS_CACHE to a writable folder") from None
    try:
        library = build_dir / json.loads(marker.read_text())["library"]
        torch.ops.load_library(str(library))
    except (OSError, ValueError, KeyError) as err:
        raise KernelUnavailable(f"cannot load the build in {build_dir} ({err}); delete that folder to rebuild it"
                                ) from None
    return getattr(torch.ops, name)


def _build(backend: str, name: str, build_dir: Path) -> None:
    # torch guesses CUDA_HOME from nvcc's folder on PATH, which can be a wrapper outside the toolkit (then the link
    # fails on -lcudart); name the toolkit before torch looks
    if not os.environ.get("CUDA_HOME") and find_cuda_home() is not None:
        os.environ["CUDA_HOME"] = str(find_cuda_home())
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)  # "No CUDA runtime is found" on GPU-less machines: noise here
    try:
        # local: only a build needs it; on import it reads CUDA_HOME (set above) and warns "No CUDA runtime is
        # found" on GPU-less machines (quieted around it)
        from torch.utils import cpp_extension
    finally:
        cpp_extension_log.setLevel(level)

    if backend == "cuda":
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    flags = _flags(backend)
    directory = kernel_source_dir()
    sources = [str(directory / s) for s in (CUDA_SOURCES if backend == "cuda" else CPU_SOURCES) if s[-2:] != ".h"]
    logger.info(f"compiling the {backend} deformable-attention kernel (first use only, 10-60 s)")
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
