"""Data-parallel processes: who am I, wait for the others, share small objects, wrap a model in DDP.

`accelerate launch --multi_gpu --num_processes N -m dualpseudo ...` (or `torchrun --nproc_per_node N`) starts N
copies of the command with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in their environment;
`init` turns those into a `torch.distributed` process group (NCCL on CUDA, gloo on CPU) and a `World`. accelerate
is the launcher; inside the process a `World` is passed explicitly to the functions that need it, so a plain
single-process call is unchanged and needs no process group (`LOCAL`).

Conventions: the global batch is fixed by the config and split evenly (`per_rank`); rank 0 alone writes files,
the others wait at a `barrier` and then read.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among `size` data-parallel processes; `size == 1` needs no process group."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        """Wait until every process gets here (a no-op for one process)."""
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (picklable plain data)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors (n, ...) of every rank in rank order -> (size * n, ...), no grad."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def all_true(self, flag: bool | torch.Tensor, device: torch.device | str = "cpu") -> bool:
        """True when `flag` is true on every rank (so all ranks take the same branch, e.g. on a NaN loss)."""
        if not self.distributed:
            return bool(flag)
        t = torch.as_tensor(bool(flag), dtype=torch.int32, device=device).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def per_rank(self, global_batch: int, name: str) -> int:
        """The per-process share of a global batch; an error naming the key when it does not divide."""
        if global_batch % self.size:
            raise ValueError(f"{name}={global_batch} is not divisible by the {self.size} processes; "
                             f"choose a multiple of {self.size} (the global batch is fixed by the config)")
        return global_batch // self.size

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`model` in DistributedDataParallel when there are several processes (gradients averaged), else itself."""
        if not self.distributed:
            return model
        ids = [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


LOCAL = World()


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group described by the launcher's environment; (world, this process's device).

    Without WORLD_SIZE > 1 in the environment this is `(LOCAL, device)`. On CUDA each process takes the GPU
    numbered by its LOCAL_RANK.
    """
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return LOCAL, device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def shutdown() -> None:
    """Leave the process group (if any) so its worker threads end before the interpreter does."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
