"""`cli.py demo`: the whole system on the built-in synthetic dataset, within a time budget, on whatever device.

Generates the videos, preprocesses them into shards, trains SKD-SRL with a tiny 3D ResNet, evaluates it with
several clips per video and prints the accuracy against chance. `--compare` also trains the plain cross-entropy
baseline on the same data, within the same budget.

The work is planned from this machine's speed, so that the whole demo ends within `--minutes`:
1. a few training steps on random clips give the seconds per step, from which the number of videos is chosen
   (their preparation takes at most a quarter of the budget);
2. after the videos, one real epoch of each method gives the seconds per epoch, from which the number of epochs
   is chosen to fill what is left (the run then continues from that epoch: resuming is exact).
The plan is printed and kept in OUT/plan.json; re-running the demo continues where it stopped, after a kill or
after a SIGTERM, SIGINT or SIGUSR1, on which it stops as `train` does.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dali_skd.config import EvalConfig, LoaderConfig, PreprocessConfig, TrainConfig
from dali_skd.evaluation import run_eval
from dali_skd.files import write_atomic
from dali_skd.models import build_model
from dali_skd.runtime import resolve_device
from dali_skd.signals import Stopped, stop_on_signals, stop_requested
from dali_skd.step import build_train_step
from dali_skd.training import train


@dataclass(frozen=True)
class DemoPreset:
    """The demo's model, data and planning limits."""

    classes: int = 8
    videos_per_class: tuple[int, int] = (25, 60)  # fewest, most
    epochs: tuple[int, int] = (8, 16)  # fewest that still learns the classes well, most worth training
    arch: str = "r3d10-tiny"
    batch_size: int = 16
    lr: float = 0.01
    lr_patience: int = 3
    eval_clips: int = 5
    # One video's generation and preprocessing, in training steps of this preset (measured on the 2-core
    # machine of docs/benchmarks.md): the probe measures a step, this turns it into seconds per video.
    steps_per_video: float = 0.35
    prep_share: float = 0.25  # of the budget, at most, for the videos
    margin: float = 0.08  # of the budget, kept free for what the plan cannot see


@dataclass
class DemoPlan:
    minutes: float
    step_seconds: float  # one training step of the preset, measured on random clips
    videos_per_class: int
    epochs: int = 0  # chosen after the first epoch
    epoch_seconds: dict[str, float] | None = None  # the first epoch of each method, validation included

    def describe(self) -> str:
        text = (
            f"demo plan for {self.minutes:g} minutes: measured {self.step_seconds:.2f} s/step; "
            f"{self.videos_per_class} videos per class"
        )
        if self.epoch_seconds:
            per_epoch = ", ".join(f"{m} {s:.0f} s/epoch" for m, s in self.epoch_seconds.items())
            text += f"; {per_epoch}; training {self.epochs} epochs to fit {self.minutes:g} minutes"
        return text


def run_demo(
    out: str = "runs/demo",
    compare: bool = False,
    json_path: str | None = None,
    device: str = "auto",
    minutes: float = 6.0,
    preset: DemoPreset = DemoPreset(),
) -> dict:
    with stop_on_signals():
        try:
            return _demo(out, compare, json_path, device, minutes, preset)
        except Exception as e:
            if (signal := stop_requested()) is None:
                raise
            what = e.what if isinstance(e, Stopped) else f"demo stopped by {signal}"  # e.g. its ffmpeg killed too
            raise Stopped(what, f"run `python cli.py demo --out {out}` again to continue") from e


def _demo(out: str, compare: bool, json_path: str | None, device: str, minutes: float, preset: DemoPreset) -> dict:
    from preprocess.run import run_preprocess  # the heaviest import of the demo, needed only here

    started = time.perf_counter()
    deadline = started + minutes * 60 * (1 - preset.margin)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = ["skd-srl"] + (["baseline"] if compare else [])
    plan_path = out_dir / "plan.json"
    if plan_path.exists():  # a re-run keeps its plan
        plan = DemoPlan(**json.loads(plan_path.read_text()))
    else:
        plan = _plan_videos(preset, minutes, resolve_device(device), len(methods))
        write_atomic(plan_path, json.dumps(asdict(plan), indent=2) + "\n")
    print(plan.describe(), flush=True)

    data = out_dir / "data"
    if not (data / "manifest.json").exists():
        run_preprocess(
            PreprocessConfig(
                dataset="synthetic",
                out=str(data),
                root=str(out_dir / "videos"),
                classes=preset.classes,
                videos_per_class=plan.videos_per_class,
                workers=os.cpu_count() or 1,
                resume=data.exists(),
            )
        )
    loader = LoaderConfig(data=str(data), device=device, clips_per_video=preset.eval_clips)
    configs = {
        method: TrainConfig(
            method=method,
            arch=preset.arch,
            out=str(out_dir / method),
            epochs=1,
            batch_size=preset.batch_size,
            lr=preset.lr,
            lr_patience=preset.lr_patience,
            loader=loader,
            resume="auto",
        )
        for method in methods
    }
    if not plan.epochs:  # one real epoch of each method, then as many epochs as the rest of the budget holds
        plan.epoch_seconds = {}
        for method, cfg in configs.items():
            epoch_started = time.perf_counter()
            train(cfg)
            plan.epoch_seconds[method] = time.perf_counter() - epoch_started
        plan.epochs = plan_epochs(plan.epoch_seconds, deadline - time.perf_counter(), preset)
        write_atomic(plan_path, json.dumps(asdict(plan), indent=2) + "\n")
        print(plan.describe(), flush=True)
    rows = []
    for method, cfg in configs.items():
        method_started = time.perf_counter()
        summary = train(replace(cfg, epochs=plan.epochs))
        result = run_eval(EvalConfig(checkpoint=str(out_dir / method / "best.pt"), batch_size=32, loader=loader))
        rows.append(
            {
                "method": method,
                "test_top1": result.video_top1,
                "test_top5": result.video_top5,
                "clip_top1": result.clip_top1,
                "best_val_epoch": summary.best_epoch,
                "epochs": plan.epochs,
                "seconds": time.perf_counter() - method_started,
            }
        )
    report = {
        "device": str(resolve_device(device)),
        "method": rows[0]["method"],
        "test_top1": rows[0]["test_top1"],
        "chance": 1 / preset.classes,
        "minutes_budget": minutes,
        "seconds": time.perf_counter() - started,
        "plan": asdict(plan),
        "rows": rows,
    }
    print(format_demo(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def plan_epochs(epoch_seconds: dict[str, float], seconds_left: float, preset: DemoPreset) -> int:
    """Epochs for every method (the first one is done) that fit `seconds_left`, final evaluations included.

    An evaluation sees eval_clips x (test videos = a quarter of the training videos) single-view clips forward
    only: about 0.05 x eval_clips of a two-view training epoch (a training clip costs about 3 forward passes)."""
    per_epoch = sum(epoch_seconds.values())
    evaluations = 0.05 * preset.eval_clips * per_epoch
    fits = 1 + int(max(0.0, seconds_left - evaluations) // per_epoch)
    fewest, most = preset.epochs
    if fits < fewest:
        print(f"demo: the budget holds fewer than {fewest} epochs here; training {fewest}, the fewest that learn well")
    return max(fewest, min(most, fits))


def _plan_videos(preset: DemoPreset, minutes: float, device: torch.device, methods: int) -> DemoPlan:
    """Measures a training step of the preset on random clips and picks the number of videos per class whose
    generation and preprocessing fit `prep_share` of the budget (within the preset's limits)."""
    step = measure_step(preset, device)
    seconds_per_video = preset.steps_per_video * step
    affordable = preset.prep_share * minutes * 60 / (seconds_per_video * preset.classes)
    fewest, most = preset.videos_per_class
    return DemoPlan(minutes, step, max(fewest, min(most, math.floor(affordable))))


def measure_step(preset: DemoPreset, device: torch.device, steps: int = 3) -> float:
    """Seconds per SKD-SRL training step (the trainer's own) of the preset's model and batch on random clips:
    the median of `steps`, after one warm-up."""
    torch.manual_seed(0)
    cfg = TrainConfig(arch=preset.arch, batch_size=preset.batch_size, lr=preset.lr)
    step = build_train_step(cfg, build_model(preset.arch, preset.classes), preset.classes, device)
    shape = (preset.batch_size, 3, cfg.loader.clip_len, cfg.loader.crop, cfg.loader.crop)
    views = [torch.rand(shape, device=device) * 2 - 1 for _ in range(2)]
    labels = torch.randint(0, preset.classes, (preset.batch_size,), device=device)
    times = []
    for _ in range(steps + 1):
        begin = time.perf_counter()
        step(views, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:])


def format_demo(report: dict) -> str:
    lines = [
        f"\nSynthetic motion dataset, {report['rows'][0]['method']} on {report['device']}; "
        f"chance {report['chance']:.1%}",
        f"{'method':<14}{'test top-1':>12}{'top-5':>9}{'clip top-1':>12}{'epochs':>8}{'minutes':>9}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['method']:<14}{r['test_top1']:>12.1%}{r['test_top5']:>9.1%}{r['clip_top1']:>12.1%}"
            f"{r['epochs']:>8}{r['seconds'] / 60:>9.1f}"
        )
    lines.append(f"total {report['seconds'] / 60:.1f} minutes (budget {report['minutes_budget']:g})")
    return "\n".join(lines)
