"""`cli.py bench`: does the loader keep the GPU busy, and how does it compare with a plain DataLoader?

For each loader: two-view samples/s (median of `repeats` windows after warm-up), frames delivered and decoded per
second, and the machine's CPU use; with `--train-arch`, training-step samples/s on synthetic data already on the
device versus on the real loader, and the fraction of step time spent waiting for data.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dali_skd.config import BenchConfig, ObjectiveConfig, to_dict
from dali_skd.data.loader import TORCH_DTYPES, ClipLoader, TrainBatch, resolve_device
from dali_skd.data.shards import load_manifest
from dali_skd.data.torch_baseline import dataloader_baseline
from dali_skd.evaluate import autocast, resolve_amp
from dali_skd.methods import build_method
from dali_skd.models import build_model

LOADERS = ("dali", "dataloader")


def cpu_busy_seconds() -> float | None:
    """Busy CPU time of the whole machine so far, from /proc/stat (None where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@dataclass
class Rate:
    samples_per_s: float
    windows: list[float]
    cpu_cores_busy: float | None
    extra: dict[str, float] = field(default_factory=dict)


def measure(
    batches: Iterator[Any],
    batch_size: int,
    seconds: float,
    repeats: int,
    sync: Callable[[], None],
    on_start: Callable[[], None] = lambda: None,
) -> tuple[Rate, float]:
    """Samples/s over `repeats` windows of seconds/repeats each, after a warm-up of at least two batches and 10%
    of the time (`on_start` runs when the warm-up ends). Returns the rate and the measured wall time."""
    warm_end = time.perf_counter() + 0.1 * seconds
    for i, _ in enumerate(batches):
        if i >= 1 and time.perf_counter() >= warm_end:
            break
    sync()
    on_start()
    windows, total = [], 0.0
    cpu0 = cpu_busy_seconds()
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        while True:
            next(batches)
            n += 1
            if time.perf_counter() - start >= seconds / repeats:
                break
        sync()
        elapsed = time.perf_counter() - start
        windows.append(n * batch_size / elapsed)
        total += elapsed
    cpu1 = cpu_busy_seconds()
    busy = (cpu1 - cpu0) / total if cpu0 is not None and cpu1 is not None else None
    return Rate(statistics.median(windows), windows, busy), total


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def bench_dali(cfg: BenchConfig, device: torch.device, precision: str) -> Rate:
    loader = ClipLoader(
        cfg.loader, "train", train=True, batch_size=cfg.batch_size, num_views=2, augment=cfg.augment,
        dtype=precision, device=device,
    )  # fmt: skip
    loader.steps_per_epoch = 1 << 40  # one endless epoch
    batches = loader.epoch(0)
    rate, _ = measure(batches, cfg.batch_size, cfg.seconds, cfg.repeats, _sync(device))
    batches.close()
    # JPEG rows decoded per frame delivered: strips are decoded from their top down to the last frame needed
    overhead = loader.stats.decoded_frames / max(loader.stats.clip_frames, 1)
    rate.extra["decoded_frames_per_s"] = rate.samples_per_s * 2 * cfg.loader.clip_len * overhead
    return rate


def bench_dataloader(cfg: BenchConfig, device: torch.device, precision: str) -> Rate:
    loader = dataloader_baseline(cfg.loader, cfg.augment, cfg.batch_size, cfg.workers)
    dtype = TORCH_DTYPES[precision]

    def to_device() -> Iterator[tuple[torch.Tensor, ...]]:
        for v1, v2, labels in loader:
            yield tuple(t.to(device, non_blocking=True) for t in (v1.to(dtype), v2.to(dtype), labels))

    rate, _ = measure(to_device(), cfg.batch_size, cfg.seconds, cfg.repeats, _sync(device))
    return rate


def bench_train(cfg: BenchConfig, device: torch.device, precision: str) -> dict[str, float]:
    """SKD-SRL training steps: on one synthetic batch already on the device, then fed by the DALI loader."""
    num_classes = load_manifest(cfg.loader.data).num_classes
    channels_last = cfg.channels_last and device.type == "cuda"
    model = build_model(cfg.train_arch, num_classes)
    method = build_method("skd-srl", model, num_classes, ObjectiveConfig()).to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format

    def step(views: list[torch.Tensor], labels: torch.Tensor) -> None:
        with autocast(precision, device):
            loss = method([v.to(memory_format=memory_format) for v in views], labels).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    b, crop = cfg.train_batch_size, cfg.loader.crop
    dtype = TORCH_DTYPES[precision]
    views = [torch.rand(b, 3, cfg.loader.clip_len, crop, crop, device=device, dtype=dtype) * 2 - 1 for _ in range(2)]
    labels = torch.randint(0, num_classes, (b,), device=device)

    def synthetic() -> Iterator[None]:
        while True:
            yield step(views, labels)

    half = cfg.seconds / 2
    synthetic_rate, _ = measure(synthetic(), b, half, cfg.repeats, _sync(device))

    loader = ClipLoader(
        cfg.loader, "train", train=True, batch_size=b, num_views=2, augment=cfg.augment, dtype=precision,
        device=device,
    )  # fmt: skip
    loader.steps_per_epoch = 1 << 40
    waited = [0.0]

    def real() -> Iterator[None]:
        batches = loader.epoch(0)
        while True:
            before = time.perf_counter()
            batch = next(batches)
            waited[0] += time.perf_counter() - before
            assert isinstance(batch, TrainBatch)
            yield step(batch.views, batch.labels)

    real_rate, seconds = measure(real(), b, half, cfg.repeats, _sync(device), lambda: waited.__setitem__(0, 0.0))
    return {
        "arch": cfg.train_arch,
        "batch_size": b,
        "precision": precision,
        "channels_last": channels_last,
        "synthetic_samples_per_s": synthetic_rate.samples_per_s,
        "loader_samples_per_s": real_rate.samples_per_s,
        "loader_over_synthetic": real_rate.samples_per_s / synthetic_rate.samples_per_s,
        "data_wait": waited[0] / seconds,
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    device = resolve_device(cfg.loader.device)
    precision = resolve_amp(cfg.amp, device)
    names = [n.strip() for n in cfg.loaders.split(",") if n.strip()]
    unknown = set(names) - set(LOADERS)
    if unknown:
        raise ValueError(f"unknown loader(s) {', '.join(sorted(unknown))}; known: {', '.join(LOADERS)}")
    manifest = load_manifest(cfg.loader.data)
    frames_per_sample = 2 * cfg.loader.clip_len
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_cores": os.cpu_count(),
        "data": cfg.loader.data,
        "format": manifest.format,
        "frames_per_jpeg": manifest.frames_per_jpeg,
        "precision": precision,
        "date": time.strftime("%Y-%m-%d"),
        "loaders": {},
    }
    benches = {"dali": bench_dali, "dataloader": bench_dataloader}
    for name in names:
        print(f"measuring {name} for {cfg.seconds:.0f} s ...", flush=True)
        rate = benches[name](cfg, device, precision)
        report["loaders"][name] = {
            "samples_per_s": rate.samples_per_s,
            "frames_per_s": rate.samples_per_s * frames_per_sample,
            "cpu_cores_busy": rate.cpu_cores_busy,
            "windows": rate.windows,
            **rate.extra,
        }
    if {"dali", "dataloader"} <= set(report["loaders"]):
        loaders = report["loaders"]
        report["ratio_dali_over_dataloader"] = loaders["dali"]["samples_per_s"] / loaders["dataloader"]["samples_per_s"]
    if cfg.train_arch:
        print(f"measuring {cfg.train_arch} training steps for {cfg.seconds:.0f} s ...", flush=True)
        report["train"] = bench_train(cfg, device, precision)
    report["config"] = to_dict(cfg)
    print(format_report(report))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"device {report['device']}, {report['cpu_cores']} CPU cores, {report['format']} shards, {report['precision']}",
        f"{'loader':<12}{'samples/s':>12}{'frames/s':>12}{'decoded/s':>12}{'CPU cores':>11}",
    ]
    for name, r in report["loaders"].items():
        decoded = f"{r['decoded_frames_per_s']:>12.0f}" if "decoded_frames_per_s" in r else f"{'':>12}"
        cpu = f"{r['cpu_cores_busy']:>11.1f}" if r["cpu_cores_busy"] is not None else f"{'n/a':>11}"
        lines.append(f"{name:<12}{r['samples_per_s']:>12.1f}{r['frames_per_s']:>12.0f}{decoded}{cpu}")
    if "ratio_dali_over_dataloader" in report:
        lines.append(f"dali / dataloader: {report['ratio_dali_over_dataloader']:.2f}x")
    if "train" in report:
        t = report["train"]
        lines.append(
            f"training {t['arch']} (batch {t['batch_size']}, {t['precision']}): "
            f"{t['synthetic_samples_per_s']:.1f} samples/s on synthetic data, {t['loader_samples_per_s']:.1f} with "
            f"the loader ({t['loader_over_synthetic']:.0%}), waiting for data {t['data_wait']:.0%} of the time"
        )
    return "\n".join(lines)
