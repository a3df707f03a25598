"""Inference preparation of a loaded network: the precision choice, FrozenBatchNorm folding, the bf16 cast,
channels_last, the lean decoder and (opt-in) ``torch.compile`` of the backbones; each lever's measured gain is in
the README ('Benchmarks', from ``av2ts bench model``).

``prepare_for_inference(model, precision, device)`` is what predict, eval and ``bench model`` call on a model they will
only run forward; ``precision_context(precision, device)`` is the context its forward runs in. The default precision
on a CPU is the faster one *as measured*: ``measure_precisions`` times a matrix product and a 3x3 convolution in fp32
and bf16 (a fraction of a second) and ``precision_from_figures`` picks bf16 only where it is at least ``BF16_MARGIN``
faster (a CPU that reports AVX512-BF16 without AMX can run bf16 slower than fp32). The app measures once per machine,
torch version and thread count and caches the figures (``processes.cpu_precision``); the network package alone,
given no measurement, falls back to the CPU's flags (``cpu_has_native_bf16``). GPUs default to fp32 (their figures
are not measured here).

On a CPU, bf16 means the whole forward in bf16: the weights are cast once (autocast would cast every weight at every
call, and it leaves the pixel decoder in fp32), the backbones' FrozenBatchNorms are folded into their convolutions
and the convolutions run channels_last; autocast stays on as a safety net for any fp32 activation that meets a bf16
weight. Sampling locations, attention weights and the final softmax/sigmoid stay fp32 (pixel_decoder.py,
av2ts.py ``segment``). On CUDA, bf16 and fp16 are autocast over fp32 weights, as before.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from torch import nn

from av2ts_cli.config import cache_root
from av2ts_cli.model.blocks import FrozenBatchNorm2d

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKBONES = ("backbone", "siam_backbone")  # the stable parts: fixed shapes for a given input size


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 pays off."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


BF16_MARGIN = 1.1  # bf16 is the CPU's default where it measures at least this much faster than fp32
MEASURE_VERSION = 2  # the method of measure_precisions: another version is measured anew, not read from a cache
MATMUL_SIDE = 768  # [n, n] @ [n, n]: 0.9 GFLOP, like the transformer layers' products
CONV_SHAPE = (64, 40)  # channels in and out, side: a 3x3 convolution of 0.24 GFLOP


def _fastest_runs(fns: dict, budget_s: float) -> dict:
    """{name: the fastest timed run of fns[name]}: each warmed up once, then run in turn (so a busy machine slows
    them alike), at least twice each and on until ``budget_s`` has passed."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < 2 or (time.perf_counter() - start < budget_s and rounds < 50):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - begin)
        rounds += 1
    return best


@torch.inference_mode()
def measure_precisions(budget_s: float = 0.06) -> dict:
    """This CPU's arithmetic in fp32 and in bf16, measured now with torch's current thread count: a
    ``MATMUL_SIDE`` square matrix product and a 3x3 convolution (``CONV_SHAPE``; channels_last in bf16, as
    ``prepare_for_inference`` runs it, contiguous in fp32, as the fp32 path does), each warmed up, then the two
    precisions run in turn for about ``budget_s`` (the fastest run of each counts). Returns {"matmul_gflops":
    {"fp32", "bf16"}, "conv_gflops": {"fp32", "bf16"}, "bf16_speedup": the geometric mean of the two bf16/fp32
    ratios, "seconds": the whole measurement, "version": MEASURE_VERSION}. About 0.3 s on 2 quiet cores."""
    started = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    n = MATMUL_SIDE
    channels, side = CONV_SHAPE
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    x = torch.randn(1, channels, side, side, generator=g)
    matmuls, convs = {}, {}
    for precision in ("fp32", "bf16"):
        dtype = DTYPES[precision]
        layout = torch.channels_last if precision == "bf16" else torch.contiguous_format
        ad, bd = a.to(dtype), b.to(dtype)
        conv = nn.Conv2d(channels, channels, 3, padding=1).eval().to(dtype).to(memory_format=layout)
        xd = x.to(dtype).contiguous(memory_format=layout)
        matmuls[precision] = lambda ad=ad, bd=bd: ad @ bd
        convs[precision] = lambda conv=conv, xd=xd: conv(xd)
    flops = {"matmul_gflops": 2 * n ** 3, "conv_gflops": 2 * channels * channels * 9 * side * side}
    figures: dict = {}
    for key, fns in (("matmul_gflops", matmuls), ("conv_gflops", convs)):
        figures[key] = {p: flops[key] / seconds / 1e9 for p, seconds in _fastest_runs(fns, budget_s).items()}
    ratios = [figures[k]["bf16"] / figures[k]["fp32"] for k in ("matmul_gflops", "conv_gflops")]
    for key in ("matmul_gflops", "conv_gflops"):
        figures[key] = {p: round(v, 1) for p, v in figures[key].items()}
    figures["bf16_speedup"] = round(float((ratios[0] * ratios[1]) ** 0.5), 3)
    figures["seconds"] = round(time.perf_counter() - started, 3)
    figures["version"] = MEASURE_VERSION
    return figures


def precision_from_figures(figures: dict, margin: float = BF16_MARGIN) -> str:
    """The CPU's default precision from ``measure_precisions``' figures: bf16 where it is at least ``margin``
    faster than fp32 (geometric mean of the matrix product and the convolution), else fp32."""
    return "bf16" if figures["bf16_speedup"] >= margin else "fp32"


def default_precision(device: torch.device | str, cpu_precision: str | None = None) -> str:
    """On a CPU, ``cpu_precision`` (the measured faster precision, ``precision_from_figures``), or, without a
    measurement, bf16 where the CPU has native bf16; fp32 on other devices."""
    if torch.device(device).type != "cpu":
        return "fp32"
    if cpu_precision is not None:
        return cpu_precision
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _slow_bf16(cpu_precision: str | None) -> str | None:
    """Why bf16 is not the fast path on this CPU (None: it is)."""
    if cpu_precision is None:
        return None if cpu_has_native_bf16() else "this CPU has no native bf16 (AVX512-BF16 or AMX)"
    return None if cpu_precision == "bf16" else "bf16 measured no faster than fp32 on this CPU (see av2ts info)"


def choose_precision(requested: str | None, device: torch.device | str, half: bool = False,
                     cpu_precision: str | None = None) -> tuple[str, str | None]:
    """(precision, a warning or None) for ``--precision`` (None: the default) and ``--half`` (the fast path: fp16 on
    CUDA, bf16 on a CPU where bf16 is faster, else fp32 with a warning). ``cpu_precision``: the CPU's measured
    faster precision (None: judged from its flags, ``default_precision``). ValueError for an unknown precision, for
    fp16 on a CPU, or for ``--half`` with another ``--precision`` than the fast path's."""
    kind = torch.device(device).type
    if requested is not None and requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if half:
        fast = "fp16" if kind == "cuda" else "bf16"
        if requested is not None and requested != fast:
            raise ValueError(f"--half is --precision {fast} on {kind}; it contradicts --precision {requested}")
        slow = _slow_bf16(cpu_precision) if kind != "cuda" else None
        if slow:
            return "fp32", f"--half: {slow}; running in fp32"
        return fast, None
    if requested is None:
        return default_precision(device, cpu_precision), None
    if requested == "fp16" and kind == "cpu":
        raise ValueError("--precision fp16 needs a CUDA device (CPUs compute fp16 by conversion, slower than fp32); "
                         "use bf16 or fp32 on the CPU")
    slow = _slow_bf16(cpu_precision) if requested == "bf16" and kind == "cpu" else None
    if slow:
        return "bf16", f"--precision bf16: {slow}; expect it slower than fp32"
    return requested, None


def precision_context(precision: str, device: torch.device | str):
    """The autocast context of a forward in ``precision`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


# ------------------------------------------------------------------------------------------------ BatchNorm folding
@torch.no_grad()
def fold_frozen_batch_norm(model: nn.Module, probe_size: int = 64) -> int:
    """Fold every FrozenBatchNorm2d (and every eval-mode BatchNorm2d with running statistics: av2ts-tiny's) that
    directly follows a Conv2d into that convolution (weight scaled per output channel, shift into the bias) and
    replace it by ``nn.Identity``, in place; returns how many were folded.

    The pairs are found by running each backbone (``BACKBONES`` of ``model``, or ``model`` itself when it has none)
    once on a [1, 3, probe_size, probe_size] probe with hooks: a norm is folded when its input is the
    very tensor a Conv2d returned and that Conv2d feeds nothing else. The probe's output before and after must
    agree (allclose, 1e-4 relative): otherwise the folding is undone and ValueError raised. For inference only: the
    folded model's state dict has conv biases instead of BatchNorm buffers. FrozenBatchNorms that follow no
    convolution (CED's input norm) stay.
    """
    parts = [getattr(model, name) for name in BACKBONES if getattr(model, name, None) is not None] or [model]
    return sum(_fold_part(part, probe_size) for part in parts)


def _fold_part(part: nn.Module, probe_size: int) -> int:
    if not any(_foldable(m) for m in part.modules()):
        return 0
    produced: dict[int, nn.Conv2d] = {}  # id(output tensor) -> the Conv2d that returned it
    consumers: dict[int, int] = {}  # id(conv) -> modules that took its output
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []
    keep_alive = []  # ids are only unique while the tensors live
    names = {id(m): name for name, m in part.named_modules()}

    def after_conv(conv, args, output):
        produced[id(output)] = conv
        keep_alive.append(output)

    def before_any(module, args):
        for arg in args:
            conv = produced.get(id(arg)) if isinstance(arg, torch.Tensor) else None
            if conv is not None:
                consumers[id(conv)] = consumers.get(id(conv), 0) + 1
                if _foldable(module):
                    pairs.append((conv, module))

    handles = []
    for module in part.modules():
        if not list(module.children()):  # leaves only: a container's input is its first leaf's input too
            handles.append(module.register_forward_pre_hook(before_any))
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
    param = next(part.parameters())
    probe = torch.randn(1, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0)).to(param)
    try:
        expected = part(probe)
    finally:
        for handle in handles:
            handle.remove()
    keep_alive.clear()
    folds = [(conv, bn) for conv, bn in pairs if consumers.get(id(conv)) == 1]
    undo = [(conv, conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone())
            for conv, _ in folds]
    for conv, bn in folds:
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(gamma)
        scale = gamma * (bn.running_var.double() + bn.eps).rsqrt()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        folded_bias = ((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(folded_bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(folded_bias)
        _replace(part, names[id(bn)], nn.Identity())
    got = part(probe)
    if not all(torch.allclose(g.float(), e.float(), rtol=1e-4, atol=1e-4 * float(e.float().abs().max()))
               for g, e in zip(_as_list(got), _as_list(expected), strict=True)):
        for conv, weight, bias in undo:
            conv.weight.copy_(weight)
            conv.bias = None if bias is None else nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        for _, bn in folds:
            _replace(part, names[id(bn)], bn)
        raise ValueError(f"folding the FrozenBatchNorms of {type(part).__name__} changed its output; left unfolded")
    return len(folds)


def _foldable(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return (isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats
            and module.running_mean is not None)


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ----------------------------------------------------------------------------------------------------- compile
def inductor_cache_dir() -> str:
    """Where inductor caches its compiled backbones: ``<av2ts cache>/inductor`` (``config.cache_root``), unless
    TORCHINDUCTOR_CACHE_DIR is set; a second process reuses the cache (minutes on a 2-core machine, seconds after)."""
    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    os.makedirs(path, exist_ok=True)
    return path


def compile_backbones(model: nn.Module) -> list[str]:
    """Wrap each backbone of ``model`` in ``torch.compile`` (inductor, static shapes, frozen weights); compiled at
    the first forward of each input size. Returns the names wrapped."""
    inductor_cache_dir()
    wrapped = []
    for name in BACKBONES:
        part = getattr(model, name, None)
        if part is not None:
            setattr(model, name, _CompiledBackbone(part))
            wrapped.append(name)
    return wrapped


class _CompiledBackbone(nn.Module):
    """A backbone and its ``torch.compile`` wrapper: the parameters stay under ``module.`` and ``feature_info`` is
    the backbone's; ``compile_seconds`` sums the first calls of each input shape (tracing and code generation)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.feature_info = getattr(module, "feature_info", None)
        self.compiled = torch.compile(module, dynamic=False, options={"freezing": True})
        self.compile_seconds = 0.0
        self._seen: set[tuple] = set()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [N, 3, H, W] -> the backbone's four maps."""
        key = (tuple(x.shape), x.dtype, torch.is_inference_mode_enabled())
        if key in self._seen:
            return self.compiled(x)
        start = time.perf_counter()
        out = self.compiled(x)
        self.compile_seconds += time.perf_counter() - start
        self._seen.add(key)
        return out


def compile_seconds(model: nn.Module) -> float:
    """Seconds spent compiling ``model``'s backbones so far (0 when they are not compiled)."""
    return sum(getattr(getattr(model, name, None), "compile_seconds", 0.0) for name in BACKBONES)


# ------------------------------------------------------------------------------------------------------ prepare
def prepare_for_inference(model: nn.Module, precision: str, device: torch.device | str, *, fold: bool = True,
                          cast: bool = True, channels_last: bool = True, lean_decoder: bool = True,
                          compile: bool = False) -> nn.Module:
    """``model`` (AV2TS or COMBO) on ``device`` in eval mode, made ready for forwards in ``precision`` (in place;
    returned). On a CPU in bf16: FrozenBatchNorms folded, weights cast to bf16, convolutions channels_last (each a
    keyword to switch off, for ``bench model``'s one-lever-at-a-time figures); ``lean_decoder``: the decoder makes
    its intermediate masks at the attention sizes only (``MaskedAttentionDecoder.full_masks``; exact up to rounding,
    no aux_outputs); ``compile``: ``compile_backbones``. fp32 and CUDA: folding and the lean decoder only. Its
    forward runs in ``precision_context``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    device = torch.device(device)
    model = model.to(device).eval()
    if fold:
        fold_frozen_batch_norm(model)
    if lean_decoder and hasattr(model, "decoder"):
        model.decoder.full_masks = False
    if device.type == "cpu" and precision != "fp32":
        if cast:
            model = model.to(DTYPES[precision])
            for name in ("pixel_mean", "pixel_std"):  # the input normalisation stays exact
                if isinstance(getattr(model, name, None), torch.Tensor):
                    setattr(model, name, getattr(model, name).float())
        if channels_last:  # every 4-D weight; the input follows the backbone's (AV2TS._normalise)
            model = model.to(memory_format=torch.channels_last)
    if compile:
        compile_backbones(model)
    return model
