"""Will a training run fit in memory? Asked before anything large is allocated, so that a batch too large for the
machine is one line naming the setting to lower, not the kernel's OOM killer ending the process without a word.

The estimate, for a run on the CPU (its model and its loaders' buffers share the host's memory):
- the model: its weights, their gradients and SGD's momentum, and as much again for what the step allocates
  beside them (4 x the parameters' bytes);
- the activations a training step keeps for its backward pass, per sample: measured by running the method once
  on PyTorch's meta device (shapes, no memory) at batches of 2 and 4, under `saved_tensors_hooks`; the backward
  pass holds about as much again while it runs, so twice that (measured on the 2-core machine, r3d10-tiny and
  r3d18, 16 x 112 x 112 clips: the step's peak was 1.5 and 1.9 times the saved tensors);
- the loaders' buffers, per sample: DALI holds `--loader.prefetch` + 1 batches of decoded strips, cropped clips
  and finished views (measured: 22 to 25 MiB a two-view sample of the synthetic set, against 27 estimated).

Against: the memory available (`psutil`), or what the process's cgroup (a SLURM job, a container) still allows
where that is less, shared among the processes torchrun runs on the machine. On a GPU the model and the clips live
in its memory, where an allocation that fails is CUDA's one-line error, not a kill: nothing is estimated there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from dali_skd.config import TrainConfig
from dali_skd.data.loader import ClipLoader
from dali_skd.errors import ConfigError
from dali_skd.methods import build_method, method_class
from dali_skd.models import build_model

GIB = 1 << 30
BACKWARD = 2  # a step's peak, in saved activations
MODEL = 4  # the model's memory, in its parameters' bytes


@dataclass(frozen=True)
class TrainingMemory:
    """A training run's memory, in bytes: what does not grow with the batch, and what each sample adds."""

    model: int
    activations: int  # per sample, the backward pass's peak
    loaders: int  # per sample, the training and the validation loader's buffers

    def needed(self, batch: int) -> int:
        return self.model + batch * (self.activations + self.loaders)

    def largest_batch(self, available: int) -> int:
        return max(0, (available - self.model) // (self.activations + self.loaders))


def saved_activations(cfg: TrainConfig, num_classes: int) -> int:
    """The bytes a training step of `cfg`'s method and model keeps for its backward pass, per sample."""

    def saved(batch: int) -> int:
        with torch.device("meta"):
            model = build_model(cfg.arch, num_classes, shortcut=cfg.shortcut)
            stand_in = build_model(cfg.arch, num_classes) if method_class(cfg.method).needs_teacher else None
            method = build_method(cfg.method, model, num_classes, cfg.objective, stand_in)  # a teacher saves nothing
        model.freeze(cfg.freeze)
        method.train()
        views = [torch.empty(batch, 3, cfg.clip.length, cfg.clip.crop, cfg.clip.crop, device="meta")] * method.num_views
        tensors: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            tensors[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            method(views, torch.zeros(batch, dtype=torch.long, device="meta"))
        return sum(tensors.values())

    return (saved(4) - saved(2)) // 2  # the weights it saves too are the same at both (BatchNorm needs 2 samples)


def loader_buffers(loader: ClipLoader, views: int, dtype_bytes: int) -> int:
    """The bytes a loader's DALI pipeline holds per sample of a batch: `--loader.prefetch` + 1 batches of decoded
    frames (16:9 frames at the shards' short side: the widest common), cropped clips and finished views."""
    manifest, clip = loader.manifest, loader.clip
    frame = manifest.short_side * math.ceil(manifest.short_side * 16 / 9) * 3
    frames = loader.layout.slots * manifest.frames_per_jpeg if manifest.format == "jpeg" else clip.length * 2
    cropped = clip.length * clip.crop * clip.crop * 3
    return (loader.loader.prefetch + 1) * views * (frames * frame + cropped + cropped * dtype_bytes)


def training_memory(
    cfg: TrainConfig, num_classes: int, parameters: int, train: ClipLoader, val: ClipLoader
) -> TrainingMemory:
    """The memory of a training run of `cfg` on the CPU whose model (and method, teacher) hold `parameters`
    bytes, read by these loaders (the validation's batch of clips counted as the training's of samples)."""
    dtype_bytes = (
        4 if train.runtime.precision == "fp32" else 2
    )  # with autocast, most activations are kept at 2 bytes too
    activations = saved_activations(cfg, num_classes) * dtype_bytes // 4
    loaders = loader_buffers(train, train.layout.num_views, dtype_bytes) + loader_buffers(val, 1, dtype_bytes)
    return TrainingMemory(MODEL * parameters, BACKWARD * activations, loaders)


def available_memory() -> int:
    """The bytes this process may still allocate: the host's available memory, or what its cgroup allows where
    that is less, shared among the processes torchrun runs on this machine."""
    room = min(psutil.virtual_memory().available, _cgroup_room())
    return room // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _cgroup_room() -> int:
    """What the memory cgroups this process is in (v2, or v1's memory controller) still allow: the least of their
    limits less their usage, from its own up to the root (effectively unlimited where none is set or readable)."""
    room = 1 << 62
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return room
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, limit_name, usage_name = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit_name, usage_name = (
                Path("/sys/fs/cgroup/memory"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        else:
            continue
        group = root / path.lstrip("/")
        while True:
            try:
                limit = (group / limit_name).read_text().strip()
                if limit != "max":
                    room = min(room, int(limit) - int((group / usage_name).read_text()))
            except (OSError, ValueError):
                pass
            if group == root:
                break
            group = group.parent
    return room


def check_training_memory(cfg: TrainConfig, memory: TrainingMemory) -> None:
    """Refuses a run whose estimate exceeds the memory available, naming what to lower and how far."""
    available, needed = available_memory(), memory.needed(cfg.batch_size)
    if needed <= available:
        return
    largest = memory.largest_batch(available)
    lower = f"lower --batch-size to {largest} or less" if largest else "lower --clip.length or --clip.crop"
    raise ConfigError(
        f"--batch-size {cfg.batch_size} needs about {needed / GIB:.1f} GiB of memory here (the model "
        f"{memory.model / GIB:.1f} GiB, the training step's activations {memory.activations * cfg.batch_size / GIB:.1f}"
        f" GiB, the loaders' buffers {memory.loaders * cfg.batch_size / GIB:.1f} GiB), and {available / GIB:.1f} GiB "
        f"is available: {lower} (or free memory, or use a GPU)"
    )
