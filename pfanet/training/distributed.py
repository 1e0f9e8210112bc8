"""The processes of a run: one, or several under torchrun (WORLD_SIZE, RANK, LOCAL_RANK), and what they do together.

Every collective here must be called by every process at the same point of the run, in the same order: the loop
sums two numbers over the processes each step (whether each has a batch, and whether any wants to stop), a
checkpoint gathers their RNG states, and the run ends with a barrier.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistributedEnv:
    """This process's place in the run. `start()` joins (or, under torchrun, sets up) the process group."""

    world: int = 1
    rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    own_group: bool = False  # the process group was set up here, and is destroyed by close()

    @classmethod
    def start(cls, device: str | None = None, collective_timeout: float = 7200.0) -> DistributedEnv:
        """The environment torchrun describes (or a single process): NCCL between GPUs, gloo between CPUs;
        `collective_timeout` bounds how long a process waits for the others (e.g. while rank 0 validates)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device:
            dev = torch.device(device)
        elif torch.cuda.is_available():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            dev = torch.device("cpu")
        own = False
        if world > 1 and not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=collective_timeout))
            own = True
        return cls(world, dist.get_rank() if world > 1 else 0, dev, own)

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes the run's files."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network as the steps run it: DistributedDataParallel (which averages gradients) on several processes."""
        if self.world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def sum(self, *values: float) -> list[float]:
        """The sums of `values` over all processes (the values themselves in a single process)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's (CPU, GPU) generator states: dropout draws from the one on the model's device."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def close(self) -> None:
        if self.own_group:
            dist.destroy_process_group()
            self.own_group = False
