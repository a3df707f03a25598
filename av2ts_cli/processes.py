"""This process's place in a job: one process, or one rank of a ``torchrun`` job (``train``, ``predict``, ``eval``,
``data maskiges``).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; ``environment`` reads and checks them. With WORLD_SIZE > 1 the
processes that talk to each other join one group through ``Processes.start``: ``train`` over nccl on CUDA (the
gradients) and gloo on CPU; ``predict`` and ``eval`` over gloo everywhere, since they pass only a few small
objects (reports, per-video scores) and gloo also runs across nodes without GPUs. With CUDA each rank takes the
GPU of its LOCAL_RANK (``device_for``).

The environment check and ``device_for`` load no torch: ``data maskiges --masks-from`` shards frames without it.

The precision choice: ``auto`` on a CPU is the faster of fp32 and bf16 *as measured* on this machine
(``model.inference.measure_precisions``, a fraction of a second), measured once per CPU model, torch version and
thread count and kept in ``<av2ts cache>/precision.json`` (``cpu_precision``), like cuDNN's benchmark mode;
``--precision`` forces one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from av2ts_cli import files
from av2ts_cli.config import cache_root
from av2ts_cli.console import warn
from av2ts_cli.errors import UsageError
from av2ts_cli.interrupts import ignore_sigterm

if TYPE_CHECKING:
    import torch

# How long a rank waits at a collective for the others. predict and eval meet once, after their shards: a rank
# that drew the longer videos may finish hours after the others. A rank that dies does not leave the rest
# waiting that long: torchrun stops every process of the job when one fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside it."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
    return rank, world, local


def device_for(device: str, local_rank: int, world: int) -> str:
    """The device a rank uses for ``--device``: with several processes, ``auto`` and any CUDA device (``cuda``,
    ``cuda:N``; on a machine with CUDA) become ``cuda:LOCAL_RANK`` (modulo the GPUs there are), as ``train`` always
    placed its ranks; ``cpu`` stays."""
    if world > 1 and (device == "auto" or device.startswith("cuda")):
        import torch  # local: data maskiges --masks-from shards load no torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _distributed():
    import torch.distributed  # local: see the module docstring (environment and device_for load no torch)

    return torch.distributed


@dataclass
class Processes:
    """This process's place in a (possibly one-process) job, and the collectives between its processes (identities
    for one process). ``device``: this rank's ``torch.device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: str, backend: str | None = None) -> Processes:
        """This process's place; under torchrun (WORLD_SIZE > 1) join the group: ``backend`` None picks nccl for a
        CUDA device and gloo otherwise."""
        import torch  # local: see the module docstring

        rank, world_size, local_rank = environment()
        requested = resolve_device(device_for(device, local_rank, world_size))
        if world_size <= 1:
            return cls(device=requested)
        if requested.type == "cuda":
            torch.cuda.set_device(requested)
        dist = _distributed()
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if requested.type == "cuda" else "gloo"),
                                    timeout=COLLECTIVE_TIMEOUT)
        return cls(rank, world_size, local_rank, requested)

    def finish_together(self) -> None:
        """Every process ignores SIGTERM, then waits at a barrier until all of them do: past this point no process
        is cut off when another exits first. torchrun stops the whole job (SIGTERM) as soon as one process exits
        non-zero; without this, a rank still between its last collective and its exit was reported as killed
        (exitcode -15) instead of with its own exit code (seen once in CI on 2 loaded cores). Call it only where
        every process arrives (after a collective all of them reached), never on an error path."""
        if self.distributed:
            ignore_sigterm()
            self.barrier()

    def stop(self) -> None:
        """Leave the group. From here on a SIGTERM is ignored: this process's work is done and combined, and
        torchrun stops every process of the job (SIGTERM) as soon as one exits non-zero, which would cut rank 0 off
        while it prints the combined report."""
        if not self.distributed:
            return
        ignore_sigterm()
        if _distributed().is_initialized():
            _distributed().destroy_process_group()

    def sum(self, values):
        """``values`` (a tensor) summed over the processes (an all-reduce), on the CPU."""
        if self.distributed:
            dist = _distributed()
            values = values.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(values)
        return values.cpu()

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        _distributed().all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` (picklable), on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        _distributed().broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            _distributed().barrier()

    def shard(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th from its rank on, so each item goes to exactly
        one process and neighbours in the list (often videos of similar length) spread over the processes."""
        return items[self.rank::self.world_size]


# ------------------------------------------------------------------------------------------ device and precision
def resolve_device(device: str | torch.device) -> torch.device:
    """THE device choice of every command: ``auto`` (CUDA when there is one, else the CPU), a device name, or a
    ``torch.device`` (returned as it is); a UsageError for a name torch does not know or CUDA that is absent."""
    import torch  # local: see the module docstring (environment and device_for load no torch)

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's text lists every device type it knows: not this tool's choices
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: not a device av2ts runs on; choose auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


PRECISION_CACHE = "precision.json"  # under config.cache_root(): {machine key: {"precision", "figures", ...}}


def cpu_model() -> str:
    """This CPU's model string (``/proc/cpuinfo``'s model name; elsewhere ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key() -> str:
    """What a CPU precision measurement holds for: the CPU model, torch's version and its thread count, and the
    measurement's method."""
    import torch  # local: see the module docstring

    from av2ts_cli.model.inference import MEASURE_VERSION  # local: the network package imports torch

    return (f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"measure v{MEASURE_VERSION}")


def cpu_precision() -> dict:
    """The CPU's faster precision, measured once per ``machine_key`` and cached: {"precision": "fp32" or "bf16",
    "figures": ``measure_precisions``' figures, "key", "measured_at", "cached": whether it came from the cache,
    "cache": the file}. An unreadable cache is measured anew; an unwritable one only loses the reuse."""
    from av2ts_cli.model import inference  # local: the network package imports torch

    path = cache_root() / PRECISION_CACHE
    key = machine_key()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entry = entries.get(key)
    if (isinstance(entry, dict) and entry.get("precision") in ("fp32", "bf16")
            and isinstance(entry.get("figures"), dict)):
        return {**entry, "key": key, "cached": True, "cache": str(path)}
    figures = inference.measure_precisions()
    entry = {"precision": inference.precision_from_figures(figures), "figures": figures,
             "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        files.write_json(path, {**entries, key: entry})
    except OSError as err:
        warn(f"{path}: the precision measurement is not cached ({err.strerror or err})")
    return {**entry, "key": key, "cached": False, "cache": str(path)}


def resolve_precision(precision: str | None, device: torch.device, half: bool = False) -> tuple[str, dict]:
    """The precision ``eval`` and ``predict`` run at for ``--precision`` (None: ``auto``) and ``--half``
    (``model.inference.choose_precision``), and its basis: {"asked": "auto", "--half" or "--precision P",
    "measured": ``cpu_precision()`` on a CPU where the choice depends on it, else None}. A choice the device cannot
    run is a UsageError; the note on a choice that was changed (``--half`` where bf16 is not faster) is shown as a
    warning."""
    from av2ts_cli.model.inference import choose_precision  # local: the network package imports torch

    # the choice depends on the measurement only for auto, --half and bf16 (a --half with fp32 or fp16 is refused)
    measured = cpu_precision() if device.type == "cpu" and precision in (None, "bf16") else None
    try:
        chosen, note = choose_precision(precision, device, half, measured["precision"] if measured else None)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if note:
        warn(note)
    asked = "--half" if half else ("auto" if precision is None else f"--precision {precision}")
    return chosen, {"asked": asked, "measured": measured}
