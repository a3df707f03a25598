"""This process's place in a training run: one process, or one rank of a ``torchrun`` job (DDP).

Under ``torchrun`` (WORLD_SIZE > 1) the processes join one group: gloo on CPU, nccl on CUDA (each rank on the GPU
of its LOCAL_RANK). The global batch is cut into ``world_size`` equal slices (``data_order.ClipOrder``); only rank 0
writes files, evaluates and shows progress; the others meet it at the barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from av2ts_cli.runs import resolve_device


@dataclass
class Processes:
    """This process's place in a (possibly one-process) distributed run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: str) -> Processes:
        """Join the process group when started by torchrun (WORLD_SIZE > 1), else one process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        requested = resolve_device(device)
        if world_size <= 1:
            return cls(device=requested)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if requested.type == "cuda":
            requested = torch.device("cuda", local_rank)
            torch.cuda.set_device(requested)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if requested.type == "cuda" else "gloo")
        return cls(rank, world_size, local_rank, requested)

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (an all-reduce), on the CPU."""
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
