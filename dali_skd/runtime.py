"""Where and in what precision things run: the device, the precision of a run, `autocast`, and the dtype tables.

Everything that asks "GPU or CPU?" or "fp16, bf16 or fp32?" asks here, so the trainer, the evaluator, the loader
and the benchmark always agree. Imports neither DALI nor the loader.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Literal, get_args

import torch

from dali_skd.config import Amp

Precision = Literal["fp32", "fp16", "bf16"]  # what a run computes in; `Amp` is what a user asks for

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto`: the current CUDA device when there is one, else the CPU. `cuda` without a GPU is an error."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cuda":
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    return torch.device("cpu")


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """`auto`: fp16 with a grad scaler on CUDA (the fastest measured, docs/benchmarks.md), fp32 on the CPU;
    `off` is fp32."""
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if amp == "off":
        return "fp32"
    if amp not in TORCH_DTYPES:
        raise ValueError(f"unknown precision {amp!r}; choose one of {', '.join(get_args(Amp))}")
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
