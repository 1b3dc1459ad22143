"""Where and in what precision things run: the device, the precision of a run, `autocast`, and the dtype tables.

Everything that asks "GPU or CPU?" or "fp16, bf16 or fp32?" asks here, so the trainer, the evaluator, the loader
and the benchmark always agree. Imports neither DALI nor the loader.

NVIDIA DALI comes as one wheel per CUDA major version (`DALI_WHEELS`, the extras `cuda12` and `cuda13` of
pyproject.toml). An NVIDIA driver runs what was built for its own CUDA major version or an older one, so on a
machine whose driver is older than the wheel DALI's GPU pipeline fails at its first build, deep inside DALI:
`resolve_device` says so in one line before anything starts, naming both versions and the wheel to install.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import platform
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from dali_skd.config import Amp
from dali_skd.errors import ConfigError, RunFailed

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]  # what a run computes in; `Amp` is what a user asks for

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_name(device: torch.device, processes: int = 1) -> str:
    """The kind of machine a run computed on, as far as it decides the figures: the GPU's name, or the CPU's with
    the instruction set PyTorch's kernels use (runs of one seed on two such CPUs differ), and PyTorch's version."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} x {processes}"
    else:
        where = f"{cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    return f"{where}, torch {torch.__version__}"


def resolve_device(device: str) -> torch.device:
    """`auto`: the current CUDA device when there is one, else the CPU. `cuda` without a GPU is an error."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        check_dali_cuda()
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cuda":
        raise RunFailed("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """Where and in what form a loader hands its clips over: the device, this process's `rank` of `world` (each
    reads its own part of the shards), the views' precision, and whether they are channels_last_3d (N x C x T x H x W
    views of N x T x H x W x C memory). `DistContext.runtime` gives a torchrun process's."""

    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    rank: int = 0
    world: int = 1
    precision: Precision = "fp32"
    channels_last: bool = False


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """`auto`: fp16 with a grad scaler on CUDA (the fastest measured, docs/benchmarks.md), fp32 on the CPU;
    `off` is fp32."""
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if amp == "off":
        return "fp32"
    if amp not in TORCH_DTYPES:
        raise ConfigError(f"unknown precision {amp!r}; choose one of {', '.join(get_args(Amp))}")
    return amp  # type: ignore[return-value]


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """Mixed precision for the forward pass (a no-op in fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=TORCH_DTYPES[precision])


def local_cpu_share() -> int:
    """The cores this process may use, divided among the processes torchrun started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# the NVIDIA DALI wheel built for each CUDA major version, and the extra of pyproject.toml that installs it
DALI_WHEELS = {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}
DALI_WHEEL_NAME = re.compile(r"nvidia-dali(?:-nightly|-weekly)?-cuda(\d\d)\d")  # cuda130: CUDA 13


def dali_build_for(driver_major: int) -> int:
    """The CUDA major version of the DALI build for a driver of CUDA `driver_major`: its own, else the newest older
    one (a driver runs those too); its wheel is `DALI_WHEELS[...]`, its extra `cuda<major>`."""
    return max((m for m in DALI_WHEELS if m <= driver_major), default=min(DALI_WHEELS))


def dali_extra_here() -> str:
    """The extra that installs DALI's build for this machine: for its driver's CUDA, or (no driver) cuda13, which
    runs the CPU path as cuda12 does."""
    driver = driver_cuda_version()
    return f"cuda{dali_build_for(driver[0]) if driver else max(DALI_WHEELS)}"


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed NVIDIA driver runs (libcuda's cuDriverGetVersion), None without a
    driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def installed_dali_wheels() -> dict[str, int]:
    """The NVIDIA DALI wheels installed, by name, each with the CUDA major version it was built for."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if match := DALI_WHEEL_NAME.fullmatch(name):
            found[name] = int(match[1])
    return found


@dataclass(frozen=True)
class DaliCudaCheck:
    message: str
    fatal: bool  # the GPU pipeline cannot run (else a note: it runs, and a better-fitting wheel exists)


def compare_dali_cuda(driver: tuple[int, int] | None, wheels: dict[str, int]) -> DaliCudaCheck | None:
    """What is wrong between the driver's CUDA version and the DALI wheels installed, if anything. Nothing to say
    without a driver (the CPU path runs any wheel) or without a wheel (importing DALI then names the extra)."""
    if driver is None or not wheels:
        return None
    major, minor = driver
    build = dali_build_for(major)
    fits = f"{DALI_WHEELS[build]} (the extra cuda{build})"
    if len(wheels) > 1:
        return DaliCudaCheck(
            f"{' and '.join(sorted(wheels))} are all installed, into the same files, so none works for sure: pip "
            f"uninstall -y {' '.join(sorted(wheels))}, then pip install {fits}; the driver runs CUDA {major}.{minor}",
            fatal=True,
        )
    ((wheel, built_for),) = wheels.items()
    if major < min(DALI_WHEELS):
        return DaliCudaCheck(
            f"the NVIDIA driver runs CUDA {major}.{minor} at most, and NVIDIA DALI needs CUDA {min(DALI_WHEELS)} or "
            f"newer here ({wheel} is built for CUDA {built_for}): update the driver, or run on the CPU (--device cpu)",
            fatal=True,
        )
    if built_for > major:
        return DaliCudaCheck(
            f"NVIDIA DALI here is {wheel}, built for CUDA {built_for}, and the NVIDIA driver runs CUDA {major}.{minor} "
            f"at most: DALI's GPU pipeline cannot run. Install the build for CUDA {build}: pip uninstall -y {wheel}, "
            f"then pip install {fits}; or update the driver to one for CUDA {built_for}; or run on the CPU "
            "(--device cpu)",
            fatal=True,
        )
    if built_for != build:
        return DaliCudaCheck(
            f"NVIDIA DALI here is {wheel}, built for CUDA {built_for}; the NVIDIA driver runs CUDA {major}.{minor}, "
            f"which runs it too. The build for this driver: pip uninstall -y {wheel}, then pip install {fits}",
            fatal=False,
        )
    return None


@functools.cache
def check_dali_cuda() -> None:
    """Raises a RuntimeError if the installed DALI cannot run on this machine's driver; logs a note (rank 0) if it
    runs but another wheel fits the driver better. Once per process."""
    found = compare_dali_cuda(driver_cuda_version(), installed_dali_wheels())
    if found is None:
        return
    if found.fatal:
        raise RunFailed(found.message)
    if os.environ.get("RANK", "0") == "0":
        log.warning("note: %s", found.message)
