"""``av2ts bench kernels``: the deformable-attention kernel against the pure-PyTorch fallback.

The shapes are those of the pixel decoder's encoder layers: T frames (the batch), levels of 1/8, 1/16 and 1/32 of
the input (28/14/7 at 224 px, 64/32/16 at 512 px), 8 heads, 4 points, 32 channels per head, one query per position
(Q = S). Sampling locations are realistic: the queries' reference points (level pixel centres) plus offsets of a
few pixels, as a trained encoder produces; attention weights are a softmax over levels x points.

Both implementations run in one process on the same inputs, alternately (so a busy machine slows both alike), after
warm-up calls, each timed call right after an untimed one of the same implementation; the median of ``repeats`` runs
is reported, forward and forward+backward, with the speed-up as a ratio. Peak memory is the most the process grew
during one call above what it held before: sampled resident memory on CPU (after returning freed memory to the
OS), the allocator's peak on CUDA.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from rich.table import Table

from av2ts_cli.console import console
from av2ts_cli.errors import UsageError
from av2ts_cli.memory import PeakWatch
from av2ts_cli.model import ops
from av2ts_cli.model.ops import KernelError, KernelUnavailable

HEADS, POINTS, HEAD_DIM = 8, 4, 32
DEFAULT_SIZES = (224, 512)


def level_shapes(input_size: int) -> list[tuple[int, int]]:
    """Encoder levels (res3..res5) of a square input: 1/8, 1/16, 1/32 of its side."""
    return [(input_size // stride, input_size // stride) for stride in (8, 16, 32)]


def make_inputs(input_size: int, frames: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(value [T, S, 8, 32], spatial_shapes [3, 2], level_start_index [3], sampling_locations [T, S, 8, 3, 4, 2],
    attention_weights [T, S, 8, 3, 4]) with reference points + offsets of ~2 px (normal) at each level."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes(input_size), dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    total = int(sizes.sum())
    references = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                       indexing="xy"), -1).reshape(-1, 2)
                            for h, w in shapes.tolist()])  # [S, 2] (x, y)
    levels = len(shapes)
    value = torch.randn(frames, total, HEADS, HEAD_DIM, generator=generator)
    offsets = 2 * torch.randn(frames, total, HEADS, levels, POINTS, 2, generator=generator)
    locations = references[None, :, None, None, None, :] + offsets / shapes.flip(-1)[None, None, None, :, None, :]
    weights = torch.randn(frames, total, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(frames, total, HEADS, levels, POINTS)
    return tuple(t.to(device) for t in (value, shapes, starts, locations.contiguous(), weights))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _alternate(calls: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 2
               ) -> dict[str, list[float]]:
    """Seconds per call of each callable, taking turns so machine noise hits all of them alike. Each timed call
    follows an untimed call of the same callable, so it runs in the cache and allocator state of a loop of its own
    kind: straight after the fallback (hundreds of MB allocated and freed), the kernel's output would come in fresh
    pages from the OS and its inputs from memory, a cost of taking turns, not of the kernel (measured: 3.0 ms
    instead of 1.9 ms at 224 px)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            call()
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _peak_memory_mib(call: Callable[[], object], device: str) -> float:
    """Most the process grew during one call (MiB): the CUDA allocator's peak, or the resident size sampled every
    0.5 ms (a 224 px kernel call takes about 2 ms) after freed heap pages went back to the OS."""
    with PeakWatch(torch.device(device), interval=0.0005, trim=True) as watch:
        call()
    return watch.growth_mib()


def _forward_backward(attention, inputs, grad_output):
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]

    def call():
        out = attention(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad_output)
        for leaf in leaves:
            leaf.grad = None

    return call


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _summary(times: dict[str, list[float]]) -> dict:
    fallback, kernel = statistics.median(times["fallback"]), statistics.median(times["kernel"])
    return {"fallback_ms": round(fallback * 1e3, 3), "kernel_ms": round(kernel * 1e3, 3),
            "speedup": round(fallback / kernel, 1), "runs": len(times["kernel"])}


def _time_case(implementations: dict[str, Callable], size: int, inputs: tuple[torch.Tensor, ...], repeats: int,
               device: str) -> dict:
    value, shapes, _, locations, _ = inputs
    with torch.no_grad():
        outputs = {name: f(*inputs) for name, f in implementations.items()}
        inference = {name: (lambda f=f: f(*inputs)) for name, f in implementations.items()}
        forward = _alternate(inference, repeats, device)
        memory = {f"{name}_forward": _peak_memory_mib(call, device) for name, call in inference.items()}
    grad_output = torch.randn_like(outputs["kernel"])
    training = {name: _forward_backward(f, inputs, grad_output) for name, f in implementations.items()}
    forward_backward = _alternate(training, max(3, repeats // 2), device)
    memory.update({f"{name}_forward_backward": _peak_memory_mib(call, device) for name, call in training.items()})
    return {
        "input_size": size, "levels": shapes.tolist(), "queries": value.shape[1],
        "samples": locations[..., 0].numel(),
        "max_abs_difference": float((outputs["kernel"] - outputs["fallback"]).abs().max()),
        "forward": _summary(forward), "forward_backward": _summary(forward_backward),
        "peak_memory_mib": {k: round(v, 1) for k, v in memory.items()},
    }


def run(sizes=DEFAULT_SIZES, frames: int = 5, repeats: int = 15, device: str = "cpu", threads: int | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Time the kernel of ``device`` against the fallback at each input size; see the module docstring."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if threads:
        torch.set_num_threads(threads)
    backend = "cuda" if device == "cuda" else "cpp"
    if ops.requested_backend() not in ("auto", backend):
        raise UsageError(f"{ops.ENV_VAR}={ops.requested_backend()}: unset it to benchmark the {backend} kernel")
    try:  # the kernel or an error, never a silent fallback
        ops.load_kernel(backend)
    except KernelUnavailable as err:
        raise KernelError(f"cannot benchmark the {backend} kernel: {err}") from None
    implementations = {"fallback": ops.ms_deform_attn_torch, "kernel": ops.ms_deform_attn}
    cases = []
    for size in sizes:
        if progress:
            progress(f"{size} px, T={frames}")
        cases.append(_time_case(implementations, size, make_inputs(size, frames, device), repeats, device))
    return {"device": device, "device_name": _device_name(device), "backend": backend,
            "threads": torch.get_num_threads(), "frames": frames, "heads": HEADS, "points": POINTS,
            "head_dim": HEAD_DIM, "dtype": "float32", "repeats": repeats, "cases": cases}


def print_report(report: dict) -> None:
    table = Table(title=f"deformable attention: {report['backend']} kernel vs pure-PyTorch fallback "
                        f"({report['device_name']}, T={report['frames']}, fp32)")
    for column in ("input", "pass", "fallback ms", "kernel ms", "speed-up", "fallback MiB", "kernel MiB"):
        table.add_column(column, justify="left" if column in ("input", "pass") else "right")
    for case in report["cases"]:
        memory = case["peak_memory_mib"]
        for name, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            timing = case[name]
            table.add_row(f"{case['input_size']} px", label,
                          f"{timing['fallback_ms']:.2f}", f"{timing['kernel_ms']:.2f}", f"{timing['speedup']:.1f}x",
                          f"{memory['fallback_' + name]:.1f}", f"{memory['kernel_' + name]:.1f}")
    console.print(table)
    console.print(f"median of {report['repeats']} forward runs (half as many forward+backward) per implementation, "
                  "alternating in one process on the same inputs; MiB: peak growth during one call; queries = "
                  + ", ".join(f"{c['queries']} at {c['input_size']} px" for c in report["cases"]))
