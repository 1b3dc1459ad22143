"""torchrun's environment as one small object: which process this is, its device, and the reductions the trainer
and evaluator need, by name. Without torchrun it is a world of one and every call is a no-op."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from dali_skd.errors import RunFailed
from dali_skd.runtime import Precision, Runtime, resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    host_group: Any = None  # gloo, for agreements on the CPU; None: the default group (gloo already, or no ranks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def runtime(self, precision: Precision = "fp32", channels_last: bool = False) -> Runtime:
        """What this process's loaders hand over: its part of the data, on its device, in `precision`."""
        return Runtime(self.device, self.rank, self.world, precision, channels_last)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def _wire(self) -> torch.device:
        """Where a reduction's tensor lives: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum_named(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Each named value (a number, or a sequence of them) summed over all ranks, in one reduction (float64 on the
        wire, so counts stay exact): a float, or a list of floats, by name. Every rank passes the same names, with
        sequences of the same lengths."""
        parts = {name: [float(x) for x in np.ravel(v)] for name, v in values.items()}
        flat = [x for part in parts.values() for x in part]
        if self.distributed:
            t = torch.tensor(flat, dtype=torch.float64, device=self._wire)
            dist.all_reduce(t)
            flat = t.tolist()
        out, at = {}, 0
        for name, part in parts.items():
            out[name] = flat[at] if np.ndim(values[name]) == 0 else flat[at : at + len(part)]
            at += len(part)
        return out

    def any(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set (on every rank)."""
        return bool(self.sum_named({"flag": flag})["flag"]) if self.distributed else flag

    def every(self, flag: bool) -> bool:
        """Whether every rank's `flag` is set (on every rank): one number reduced on the CPU, which never waits for
        the GPU's queue, so that the trainer can ask it every step (has every rank a batch?) at tens of
        microseconds."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.host_group)
        return bool(t.item())

    def barrier(self) -> None:
        """Waits until every rank has come here."""
        if self.distributed:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank. Pickled on the wire: for per-video results gathered
        once at the end of an evaluation, not for anything in the training loop."""
        if not self.distributed:
            return [value]
        values: list[T] = [value] * self.world  # placeholders, replaced by what each rank sent
        dist.all_gather_object(values, value)
        return values

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._wire)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Averages BatchNorm running statistics over ranks: DDP keeps parameters equal, but each rank's last
        forward pass updates its own statistics, and evaluation and checkpoints must see one model."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world


def init_distributed(device: str) -> DistContext:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; joins the process group (NCCL on GPUs, gloo on CPUs; and a gloo
    group beside NCCL for `every`)."""
    global _host_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if wants_gpu:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RunFailed(
                f"this machine has {count} GPU(s) but torchrun started local rank {local_rank}: "
                f"use --nproc-per-node {count} (or fewer)"
            )
        torch.cuda.set_device(local_rank)
    ctx = DistContext(rank, world, local_rank, resolve_device(device))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=ctx.device if wants_gpu else None)
    if world > 1 and ctx.device.type == "cuda":
        _host_group = _host_group or dist.new_group(backend="gloo")  # once a process: made by every rank together
        ctx = replace(ctx, host_group=_host_group)
    return ctx


_host_group: Any = None


def shutdown(ctx: DistContext) -> None:
    global _host_group
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
        _host_group = None
