"""What ``av2ts info`` reports: versions, devices, the CPU's measured precision, ffmpeg, the deformable-attention
backend, caches."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from rich.table import Table

from av2ts_cli import __version__, media
from av2ts_cli.console import console
from av2ts_cli.errors import MediaError
from av2ts_cli.processes import cpu_precision
from av2ts_cli.weights.resolve import describe_parameters


def _ffmpeg_report() -> dict:
    try:
        ffmpeg = media.find_ffmpeg()
        ffmpeg_version = media.tool_version(ffmpeg)
    except MediaError as err:
        ffmpeg, ffmpeg_version = None, err.reason
    ffprobe = media.find_ffprobe()
    return {
        "ffmpeg": ffmpeg,
        "ffmpeg_version": ffmpeg_version,
        "ffprobe": ffprobe,
        "ffprobe_version": media.tool_version(ffprobe) if ffprobe else "absent (probing parses `ffmpeg -i`)",
    }


def _cuda_report() -> dict:
    import torch  # local: start-up: 1-2 s to import; only `av2ts info` reads devices

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}"})
    return {"cuda_available": torch.cuda.is_available(), "cuda_build": torch.version.cuda, "devices": devices,
            "cpu_threads": torch.get_num_threads()}


def _cache_report() -> dict:
    from huggingface_hub import constants  # local: 0.3 s to import; only `av2ts info` reports the hub cache

    from av2ts_cli.model import ops  # local: loads torch and the network package; only `av2ts info` needs it

    return {
        "huggingface_hub_cache": str(constants.HF_HUB_CACHE),
        "huggingface_offline": bool(constants.HF_HUB_OFFLINE),
        "torch_extensions": str(ops.build_root()),
    }


def _installed_version(package: str) -> str:
    """The installed version of ``package`` from its metadata, without importing it (torchaudio is otherwise
    never loaded by `av2ts info`)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict:
    """Versions (from the packages' metadata), devices and the deformable-attention backend (these two import
    torch and the network package: only torch can say what CUDA sees, only ``model.ops`` which kernel runs),
    ffmpeg, caches and av2ts's environment variables."""
    import torch  # local: start-up: loaded by model.ops anyway; its __version__ carries the build (+cu130)

    from av2ts_cli.model import ops  # local: start-up: torch and the network package; only `av2ts info` needs it

    report = {
        "av2ts": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        **{package: _installed_version(package) for package in ("torchaudio", "timm")},
    }
    report.update(_cuda_report())
    report["cpu_precision"] = cpu_precision()  # measured once per machine, torch version and thread count
    report.update(_ffmpeg_report())
    try:
        report["deform_attn_backend"] = ops.active_backend()
    except ValueError as err:  # a bad AV2TS_DEFORM_ATTN: named here, and info still reports the rest
        report["deform_attn_backend"] = f"none: {err}"
    report.update(_cache_report())
    report["env"] = {k: v for k, v in os.environ.items() if k.startswith(("AV2TS_", "HF_HUB_", "TORCH_EXTENSIONS"))}
    return report


def print_environment_report(report: dict) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in report.items():
        if key == "devices":
            value = ", ".join(f"cuda:{d['index']} {d['name']} ({d['memory_gib']} GiB)" for d in value) or "none"
        elif key == "cpu_precision":
            value = describe_cpu_precision(value)
        elif key == "env":
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "(no AV2TS_/HF_HUB_ variables set)"
        table.add_row(key, str(value))
    console.print(table)


def describe_cpu_precision(choice: dict) -> str:
    """One line for ``processes.cpu_precision()``: the choice and the figures it was made from."""
    figures = choice["figures"]
    matmul, conv = figures["matmul_gflops"], figures["conv_gflops"]
    how = f"cached in {choice['cache']}" if choice.get("cached") else "measured now"
    return (f"{choice['precision']} (the default on this CPU; bf16 {figures['bf16_speedup']}x fp32: matmul "
            f"{matmul['fp32']} vs {matmul['bf16']} GFLOP/s, 3x3 conv {conv['fp32']} vs {conv['bf16']} GFLOP/s "
            f"fp32 vs bf16; {how}, {choice.get('measured_at', '?')})")


def model_report(name_or_path: str) -> dict:
    """Parameters per part, trainable and frozen, of a preset name or a checkpoint."""
    return describe_parameters(name_or_path)


def print_model_report(report: dict) -> None:
    table = Table(title=f"{report['name']} ({report['preset']}, {report['subset']}, {report['num_classes']} classes)")
    for column in ("part", "parameters", "trainable", "frozen"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part in report["parts"]:
        table.add_row(part["part"], f"{part['parameters']:,}", f"{part['trainable']:,}", f"{part['frozen']:,}")
    total = report["total"]
    table.add_row("[bold]total", f"[bold]{total['parameters']:,}", f"{total['trainable']:,}", f"{total['frozen']:,}")
    console.print(table)
    reference = report.get("reference")
    if reference:  # modules the reference code builds but never runs (VCT: VGGish's linear layers)
        left_out = " + ".join(f"{count:,} not built ({what})" for what, count in reference["left_out"].items())
        console.print(f"reference code: {reference['parameters']:,} parameters = {total['parameters']:,} built here + "
                      f"{left_out}", highlight=False, soft_wrap=True)
