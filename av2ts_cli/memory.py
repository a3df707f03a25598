"""Peak memory, measured one way everywhere (predict's summaries, the benchmarks' columns).

- ``peak_rss_mib()``: the kernel's high-water mark of this process (``getrusage``), and of its reaped children
  (ffmpeg) with ``children=True``. Exact, but only ever grows: right for "the peak of this whole run" in a fresh
  process, which is how the benchmarks that compare peaks run each case.
- ``available_mib()``: the free memory a size option is checked against before the work starts.
- ``PeakWatch``: the peak over one stretch of work inside a long-lived process (one video, one kernel call): it
  samples the resident size in a thread (every 0.5 ms, short enough for a 2 ms kernel call) and reads the CUDA
  allocator's own peak on CUDA devices.
- ``reused_heap()``: a block whose large CPU tensors reuse freed memory instead of faulting in fresh pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import resource
import sys
import threading
import time
from collections.abc import Iterator

import psutil

MIB = 2**20


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory (MiB) of this process so far, or of its finished children with ``children``."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / MIB  # KiB on Linux, bytes on macOS


def available_mib(device=None) -> float | None:
    """Free memory in MiB that a size option is bounded by: the CPU's available memory (``psutil``, the kernel's
    MemAvailable), or a CUDA device's free memory (``device``: a ``torch.device`` of type cuda); None if unknown."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch  # local: only a CUDA device's free memory needs it (its caller has loaded torch already)

        return torch.cuda.mem_get_info(device)[0] / MIB
    try:
        return psutil.virtual_memory().available / MIB
    except (OSError, RuntimeError):
        return None


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def trim_heap() -> None:
    """Give freed heap pages back to the OS, so that a following measurement sees only new allocations."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h) and the values its dynamic threshold settles at on 64-bit Linux
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
SETTLED_MMAP_THRESHOLD = 32 * MIB  # DEFAULT_MMAP_THRESHOLD_MAX: above it glibc always maps afresh
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD
DEFAULT_MMAP_MAX = 65536


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """In the block, every allocation comes from the heap and freed memory stays there for the next one (glibc's
    ``mallopt``: no mmap, no trimming); after it, the thresholds glibc's dynamic rule settles at come back and the
    heap is trimmed. Elsewhere than glibc, nothing changes.

    Why: glibc maps every allocation above 32 MB afresh and unmaps it when freed, so each large tensor pays a page
    fault per 4 KiB page when first written. Measured on 2 cores (2026-12-08): a fresh 268 MB copy took 105 ms,
    16 ms into a reused buffer; SAM ViT-B's image encoder at 1024 px 9.1-11.1 s, 6.8-7.0 s in the block; its mask
    decoder 43-53 ms a point, 29-35 ms in the block (64 points: dozens of 0.25-0.5 GB tensors a batch)."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(0)


class PeakWatch:
    """Peak memory over a stretch of work: ``with PeakWatch(device) as watch: ...``, then ``watch.report()``.

    ``interval`` > 0 samples RSS in a background thread; 0 samples only when ``sample()`` is called (cheap enough
    to call once per window in predict). ``growth_mib()`` is the peak above the RSS at the start (after a heap
    trim when ``trim``), the figure a benchmark of one call wants.
    """

    def __init__(self, device=None, interval: float = 0.0, trim: bool = False):
        self.device = device
        self.interval = interval
        self.trim = trim
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_rss = self.peak = 0
        self.cuda_start = 0

    def _is_cuda(self) -> bool:
        return self.device is not None and getattr(self.device, "type", str(self.device)) == "cuda"

    def __enter__(self) -> PeakWatch:
        if self.trim:
            trim_heap()
        if self._is_cuda():
            import torch  # local: only for CUDA devices (torch is loaded by then); keeps memory.py torch-free

            torch.cuda.synchronize(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_rss = self.peak = rss_bytes()
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if self._is_cuda():
            import torch  # local: only for CUDA devices; keeps memory.py torch-free

            torch.cuda.synchronize(self.device)

    def growth_mib(self) -> float:
        """Most the process grew above its start (MiB): CUDA allocator memory on CUDA, RSS elsewhere."""
        if self._is_cuda():
            import torch  # local: only for CUDA devices; keeps memory.py torch-free

            return (torch.cuda.max_memory_allocated(self.device) - self.cuda_start) / MIB
        return max(0, self.peak - self.start_rss) / MIB

    def report(self) -> dict:
        """``{"rss_mb": peak RSS}`` plus ``"cuda_mb"`` (the allocator's peak) on CUDA devices."""
        self.sample()
        out = {"rss_mb": round(self.peak / MIB, 1)}
        if self._is_cuda():
            import torch  # local: only for CUDA devices; keeps memory.py torch-free

            out["cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / MIB, 1)
        return out
