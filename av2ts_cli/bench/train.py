"""``av2ts bench train``: training iterations per second and peak memory on the CPU.

A case is a preset, a batch of clips and an input size. It runs the real training step
(``training.optim.optimisation_step``: forward, criterion, backward, gradient clipping, AdamW, poly schedule) on a
synthetic batch (random frames and log-mel examples, one random disc per clip as the sounding object, S4
supervision: the first frame of each clip), with the reference optimizer groups. After warm-up steps, the median of
``steps`` timed steps is reported, with the peak resident memory of the process (``memory.peak_rss_mib``).

Each case runs twice, each time in a fresh process (so the peak memory is the case's own): with the deformable-
attention backend av2ts picks by itself, and with ``AV2TS_DEFORM_ATTN=torch``, the pure-PyTorch fallback, as the
baseline measured in the same run. ``speedup`` = baseline step time / step time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from rich.table import Table

from av2ts_cli.config import get_preset
from av2ts_cli.console import console
from av2ts_cli.errors import Av2tsError
from av2ts_cli.memory import peak_rss_mib

DEFAULT_CASES = (("av2ts-tiny", 4, None), ("av2ts-r50", 1, None))
QUICK_CASES = (("av2ts-tiny", 1, 64),)


def synthetic_batch(clips: int, frames: int, size: int, seed: int = 0) -> dict:
    """A collated batch like the training DataLoader's (see ``training.optim.optimisation_step``)."""
    import torch  # local: torch takes seconds to import; only the measuring child process needs it

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(clips, frames, size, size, dtype=torch.int64)
    for b in range(clips):
        cx, cy = (torch.rand(2, generator=g) * size * 0.6 + size * 0.2).tolist()
        radius = float(torch.rand(1, generator=g)) * size * 0.15 + size * 0.1
        masks[b, :] = (((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2).long()
    supervised = torch.zeros(clips, frames, dtype=torch.bool)
    supervised[:, 0] = True
    return {"frames": (torch.rand(clips, frames, 3, size, size, generator=g) * 255).to(torch.uint8),
            "audio": torch.randn(clips, frames, 96, 64, generator=g) - 2.0,
            "maskiges": (torch.rand(clips, frames, 3, size, size, generator=g) * 255).to(torch.uint8),
            "masks": masks, "supervised": supervised,
            "category": ["dog_barking"] * clips}  # an S4 category for each clip (VCT's prototype term reads it)


def time_training(preset: str, batch: int, size: int | None = None, steps: int = 5, warmup: int = 2,
                  frames: int = 5, threads: int | None = None) -> dict:
    """Time ``steps`` training steps of ``preset`` in this process (see the module docstring)."""
    import torch  # local: torch takes seconds to import; only the measuring child process needs it

    from av2ts_cli.model import build_model  # local: imports torch (see above)
    from av2ts_cli.model.ops import active_backend  # local: imports torch
    from av2ts_cli.training.criterion import build_criterion  # local: imports torch
    from av2ts_cli.training.optim import PolySchedule, build_optimizer, optimisation_step  # local: imports torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_preset(preset, "s4")
    size = size or cfg.input_size
    model = build_model(cfg).train()
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PolySchedule(10_000))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = synthetic_batch(batch, frames, size)
    device = torch.device("cpu")
    runs = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimisation_step(model, criterion, optimizer, scheduler, scaler, data, device, cfg.siam)
        if i >= warmup:
            runs.append(time.perf_counter() - start)
    step = statistics.median(runs)
    return {"preset": preset, "siam": cfg.siam, "batch": batch, "frames": frames, "input_size": size,
            "parameters": sum(p.numel() for p in model.parameters()), "backend": active_backend(),
            "threads": torch.get_num_threads(), "step_s": step, "runs_s": runs, "iterations_per_s": 1.0 / step,
            "clips_per_s": batch / step, "peak_rss_mib": peak_rss_mib()}


def _in_subprocess(case: dict, backend: str | None) -> dict:
    env = dict(os.environ)
    if backend is None:
        env.pop("AV2TS_DEFORM_ATTN", None)
    else:
        env["AV2TS_DEFORM_ATTN"] = backend
    result = subprocess.run([sys.executable, "-m", "av2ts_cli.bench.train", json.dumps(case)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise Av2tsError(f"bench train: the {case['preset']} case failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(cases=DEFAULT_CASES, steps: int = 5, warmup: int = 2, threads: int | None = None, progress=None) -> dict:
    """Every (preset, batch, size or None) case with av2ts's own deform-attn backend and with the pure-PyTorch
    one, each in a fresh process. ``progress``: called with a description before each measurement."""
    results = []
    for preset, batch, size in cases:
        case = {"preset": preset, "batch": batch, "size": size, "steps": steps, "warmup": warmup,
                "threads": threads}
        if progress:
            progress(f"{preset} batch {batch}: av2ts backend")
        timing = _in_subprocess(case, None)
        if progress:
            progress(f"{preset} batch {batch}: torch backend (baseline)")
        baseline = _in_subprocess(case, "torch")
        timing["baseline"] = {"backend": baseline["backend"], "step_s": baseline["step_s"],
                              "peak_rss_mib": baseline["peak_rss_mib"]}
        timing["speedup"] = baseline["step_s"] / timing["step_s"]
        results.append(timing)
    return {"what": "training step (forward, criterion, backward, clipping, AdamW) on CPU, fp32",
            "steps": steps, "warmup": warmup, "results": results}


def print_report(report: dict) -> None:
    table = Table(title=f"{report['what']}; median of {report['steps']} steps")
    for column in ("model", "batch", "input", "backend", "it/s", "clips/s", "peak RSS", "baseline it/s",
                   "baseline RSS", "speed-up"):
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    for r in report["results"]:
        base = r["baseline"]
        table.add_row(r["preset"] + (" +siam" if r["siam"] else ""), str(r["batch"]), str(r["input_size"]),
                      r["backend"], f"{r['iterations_per_s']:.2f}", f"{r['clips_per_s']:.2f}",
                      f"{r['peak_rss_mib']:.0f} MiB", f"{1 / base['step_s']:.2f}", f"{base['peak_rss_mib']:.0f} MiB",
                      f"{r['speedup']:.2f}x")
    console.print(table)
    console.print(f"baseline: the same step with the {report['results'][0]['baseline']['backend']} deform-attn "
                  "backend (AV2TS_DEFORM_ATTN=torch), in the same run" if report["results"] else "no cases")


if __name__ == "__main__":  # one measurement in a fresh process: python -m av2ts_cli.bench.train '<case JSON>'
    spec = json.loads(sys.argv[1])
    print(json.dumps(time_training(spec["preset"], spec["batch"], spec["size"], spec["steps"], spec["warmup"],
                                   threads=spec["threads"])))
