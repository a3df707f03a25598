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

With ``peer=True`` the peer package ``torch-ms-deform-attn`` (a standalone build of the Deformable-DETR op, kept out
of av2ts's install) is the third implementation in the same alternation, forward and forward+backward; its output
and gradients are compared with av2ts's kernel's on the same inputs first, so the ratio (peer / av2ts) is of the
same operation.
"""

from __future__ import annotations

import importlib
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
PEER_PACKAGE, PEER_MODULE = "torch-ms-deform-attn", "torch_ms_deform_attn"
# setuptools.command.bdist_wheel, which the peer's setup.py imports, exists from setuptools 70.1 (measured: with the
# venv's 65.5 the build stops at "No module named 'setuptools.command.bdist_wheel'").
PEER_INSTALL = ("pip install 'setuptools>=70.1,<82' packaging wheel ninja && "
                f"pip install --no-build-isolation {PEER_PACKAGE}==0.1.1")
# fp32, outputs of magnitude ~1, sums of 12 weighted bilinear samples: two correct kernels differ by rounding only
# (measured: 2.3e-6 at 224 px, T=5, outputs up to 2.2); a difference 40x that is another operation, not rounding.
PEER_TOLERANCE = 1e-4


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


def _import_peer():
    """The peer package's module (``import torch_ms_deform_attn``): the one place it is imported, so a test can
    hide it."""
    return importlib.import_module(PEER_MODULE)


def load_peer() -> tuple[Callable[..., torch.Tensor], str]:
    """(the peer's op with av2ts's argument order, its version), or a one-line ``UsageError`` saying how to
    install it. The op takes value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
    sampling_locations [N, Q, M, L, P, 2], attention_weights [N, Q, M, L, P] and returns [N, Q, M*D]."""
    try:
        peer = _import_peer()
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == PEER_MODULE:
            raise UsageError(f"--peer: the peer package {PEER_PACKAGE} is not installed (it is not part of "
                             f"av2ts's install); install it into this environment with: {PEER_INSTALL}") from None
        # found but its own import failed, e.g. its compiled extension was built against another torch
        raise UsageError(f"--peer: {PEER_PACKAGE} is installed but does not load with torch {torch.__version__}; "
                         f"rebuild it: {PEER_INSTALL} --force-reinstall") from None
    op = peer.ms_deform_attn

    def call(value, shapes, starts, locations, weights):
        # im2col_step only chunks the batch on CUDA (the peer's CPU path ignores it); 64 is the peer's default.
        return op(value, shapes, starts, locations, weights, 64)

    return call, str(getattr(peer, "__version__", "unknown"))


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
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    summary = {"fallback_ms": round(medians["fallback"] * 1e3, 3), "kernel_ms": round(medians["kernel"] * 1e3, 3),
               "speedup": round(medians["fallback"] / medians["kernel"], 1), "runs": len(times["kernel"])}
    if "peer" in medians:  # ratios near 1 matter here: two decimals
        summary.update({"peer_ms": round(medians["peer"] * 1e3, 3),
                        "peer_over_kernel": round(medians["peer"] / medians["kernel"], 2),
                        "fallback_over_peer": round(medians["fallback"] / medians["peer"], 1)})
    return summary


def _gradients(attention, inputs, grad_output) -> list[torch.Tensor]:
    """Gradients of value, sampling_locations and attention_weights for ``grad_output`` [T, Q, 8*32]."""
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    attention(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad_output)
    return [leaf.grad for leaf in leaves]


def _peer_agreement(implementations: dict[str, Callable], inputs, outputs, grad_output) -> dict:
    """Max abs differences of the peer's output and of each gradient from av2ts's kernel's on the same inputs."""
    output = float((outputs["peer"] - outputs["kernel"]).abs().max())
    grads = zip(("value", "sampling_locations", "attention_weights"),
                _gradients(implementations["kernel"], inputs, grad_output),
                _gradients(implementations["peer"], inputs, grad_output), strict=True)
    # the location gradient scales with the level's side (a 1.0 step crosses the whole map): compare relative
    gradients = {name: float((theirs - ours).abs().max() / ours.abs().max().clamp_min(1e-12))
                 for name, ours, theirs in grads}
    return {"output_max_abs_difference": output, "gradient_max_rel_difference": gradients,
            "equal": output <= PEER_TOLERANCE and max(gradients.values()) <= PEER_TOLERANCE}


def _time_case(implementations: dict[str, Callable], size: int, inputs: tuple[torch.Tensor, ...], repeats: int,
               device: str) -> dict:
    value, shapes, _, locations, _ = inputs
    with torch.no_grad():
        outputs = {name: f(*inputs) for name, f in implementations.items()}
    grad_output = torch.randn_like(outputs["kernel"])
    # checked before timing, so the ratios below are of the same operation
    peer = _peer_agreement(implementations, inputs, outputs, grad_output) if "peer" in implementations else None
    with torch.no_grad():
        inference = {name: (lambda f=f: f(*inputs)) for name, f in implementations.items()}
        forward = _alternate(inference, repeats, device)
        memory = {f"{name}_forward": _peak_memory_mib(call, device) for name, call in inference.items()}
    training = {name: _forward_backward(f, inputs, grad_output) for name, f in implementations.items()}
    forward_backward = _alternate(training, max(3, repeats // 2), device)
    memory.update({f"{name}_forward_backward": _peak_memory_mib(call, device) for name, call in training.items()})
    case = {
        "input_size": size, "levels": shapes.tolist(), "queries": value.shape[1],
        "samples": locations[..., 0].numel(),
        "max_abs_difference": float((outputs["kernel"] - outputs["fallback"]).abs().max()),
        "forward": _summary(forward), "forward_backward": _summary(forward_backward),
        "peak_memory_mib": {k: round(v, 1) for k, v in memory.items()},
    }
    if peer is not None:
        case["peer"] = peer
    return case


def run(sizes=DEFAULT_SIZES, frames: int = 5, repeats: int = 15, device: str = "cpu", threads: int | None = None,
        progress: Callable[[str], None] | None = None, peer: bool = False) -> dict:
    """Time the kernel of ``device`` against the fallback (and the peer package's op with ``peer``) at each input
    size; see the module docstring."""
    peer_op, peer_version = load_peer() if peer else (None, None)
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
    if peer_op is not None:
        implementations["peer"] = peer_op
    cases = []
    for size in sizes:
        if progress:
            progress(f"{size} px, T={frames}")
        cases.append(_time_case(implementations, size, make_inputs(size, frames, device), repeats, device))
    report = {"device": device, "device_name": _device_name(device), "backend": backend,
              "threads": torch.get_num_threads(), "frames": frames, "heads": HEADS, "points": POINTS,
              "head_dim": HEAD_DIM, "dtype": "float32", "repeats": repeats, "cases": cases}
    if peer_op is not None:
        report["peer"] = {"package": PEER_PACKAGE, "version": peer_version, "tolerance": PEER_TOLERANCE}
    return report


def print_report(report: dict) -> None:
    peer = report.get("peer")
    versus = f" and {peer['package']} {peer['version']}" if peer else ""
    table = Table(title=f"deformable attention: {report['backend']} kernel vs pure-PyTorch fallback{versus} "
                        f"({report['device_name']}, T={report['frames']}, fp32)")
    names = ("fallback", "kernel", "peer") if peer else ("fallback", "kernel")
    # with the peer, peak memory gets a table of its own so each fits 80 columns
    memory_table = Table(title="peak memory growth during one call (MiB)") if peer else table
    times = names if peer else [f"{name} ms" for name in names]  # with the peer: "ms" in the notes, to fit
    columns = ["input", "pass", *times, "speed-up", *(["peer/kernel"] if peer else [])]
    for column in columns + ([] if peer else [f"{name} MiB" for name in names]):
        table.add_column(column, justify="left" if column in ("input", "pass") else "right")
    if peer:
        for column in ("input", "pass", *names):
            memory_table.add_column(column, justify="left" if column in ("input", "pass") else "right")
    for case in report["cases"]:
        memory = case["peak_memory_mib"]
        for name, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            timing = case[name]
            row = [f"{case['input_size']} px", label, *(f"{timing[n + '_ms']:.2f}" for n in names),
                   f"{timing['speedup']:.1f}x"]
            row += [f"{timing['peer_over_kernel']:.2f}x"] if peer else []
            mib = [f"{memory[n + '_' + name]:.1f}" for n in names]
            table.add_row(*row, *([] if peer else mib))
            if peer:
                memory_table.add_row(f"{case['input_size']} px", label, *mib)
    console.print(table)
    if peer:
        console.print(memory_table)
    console.print(f"median of {report['repeats']} forward runs (half as many forward+backward) per implementation, "
                  "alternating in one process on the same inputs; MiB: peak growth during one call; queries = "
                  + ", ".join(f"{c['queries']} at {c['input_size']} px" for c in report["cases"]))
    if peer:
        console.print("fallback, kernel, peer: ms; speed-up: fallback / kernel; peer/kernel: the peer's time over "
                      "av2ts's kernel's (above 1: av2ts is faster)")
        for case in report["cases"]:
            check = case["peer"]
            verdict = "same operation" if check["equal"] else f"DIFFERENT (tolerance {peer['tolerance']:g})"
            gradients = ", ".join(f"{k} {v:.1e}" for k, v in check["gradient_max_rel_difference"].items())
            console.print(f"{case['input_size']} px, peer vs kernel: {verdict}; output max abs difference "
                          f"{check['output_max_abs_difference']:.1e}; gradients max rel difference {gradients}",
                          highlight=False)
