"""This process's place in a run: one process, or one of many under ``torchrun`` (DDP: NCCL on GPUs, gloo on
CPUs), and the few collectives the trainer uses. Without a process group every collective is the identity,
so one code path serves both."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as torch_dist

from .errors import TrainingError


class Distributed:
    """This process's place in the run: rank, world size and device (torchrun's env vars, or one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    @classmethod
    def from_environment(cls, device: str = "auto", backend: str = "auto", timeout_minutes: int = 360) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = torch.device(device)
        if resolved.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainingError("run.device asks for CUDA but torch sees no CUDA device; set run.device = \"cpu\"")
            if resolved.index is None:
                resolved = torch.device("cuda", local_rank)
            torch.cuda.set_device(resolved)
        if world_size > 1 and not torch_dist.is_initialized():
            chosen = backend if backend != "auto" else ("nccl" if resolved.type == "cuda" else "gloo")
            # Generous: ranks wait at a barrier while rank 0 (or each rank) builds feature/latent caches.
            torch_dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
        return cls(rank, world_size, local_rank, resolved)

    def barrier(self) -> None:
        if self.initialized:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; differentiable (gradients flow back to every rank's contribution)."""
        if not self.initialized:
            return tensor
        return torch_dist.nn.functional.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor) / self.world_size if self.initialized else tensor

    def any(self, flag: bool) -> bool:
        if not self.initialized:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device if torch_dist.get_backend() == "nccl" else "cpu")
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.initialized:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        if not self.initialized:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.initialized:
            torch_dist.destroy_process_group()
