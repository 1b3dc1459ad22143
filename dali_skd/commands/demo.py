"""`cli.py demo`: the whole system on the built-in synthetic dataset, within a time budget, on whatever device.

Generates the videos, preprocesses them into shards, trains SKD-SRL with a tiny 3D ResNet, evaluates it with
several clips per video and prints the accuracy against chance. `--compare` also trains the plain cross-entropy
baseline on the same data, within the same budget. The training and evaluation are a comparison
(`comparison.run_comparison`, as `cli.py compare` runs it) of the demo's plan: OUT/table.md, OUT/runs/.

The work is planned from this machine's speed, so that the whole demo ends within `--minutes`:
1. a few training steps on random clips give the seconds per step, from which the number of videos is chosen
   (their preparation takes at most a quarter of the budget);
2. after the videos, one real epoch of each method gives the seconds per epoch and per validation, from which the
   number of epochs is chosen to fill what is left once the final evaluations are done (the runs then continue
   from that epoch: resuming is exact).
The plan is printed and kept in OUT/plan.json; re-running the demo continues where it stopped, after a kill or
after a SIGTERM, SIGINT or SIGUSR1, on which it stops as `train` does.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dali_skd.comparison import ComparisonPlan, run_comparison
from dali_skd.config import (
    ClipConfig,
    Device,
    ObjectiveConfig,
    OptimConfig,
    PreprocessConfig,
    TrainConfig,
    TrainSettings,
    device_field,
)
from dali_skd.files import write_atomic
from dali_skd.methods import build_method
from dali_skd.models import build_model
from dali_skd.plot import read_metrics
from dali_skd.runtime import resolve_device, resolve_precision
from dali_skd.settings import setting, settings
from dali_skd.signals import Stopped, stop_on_signals, stop_requested
from dali_skd.step import build_train_step
from dali_skd.training import train
from preprocess.run import run_preprocess


@settings
class DemoConfig:
    """`cli.py demo`."""

    out: str = setting("runs/demo", "where the data, runs and results go")
    minutes: float = setting(6.0, "time budget for the whole demo on this machine", more_than=0)
    compare: bool = setting(False, "also train the plain cross-entropy baseline, within the same budget")
    json: str | None = setting(None, "also write the results to this file")
    device: Device = device_field()


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
    # One video's generation and preprocessing, in training steps of this preset, measured on the 2-core machine of
    # docs/benchmarks.md (both are CPU work there). On a machine whose steps run on a GPU it underrates a video; if it
    # is wrong, the videos take more or less than their `prep_share` of the budget, and the epochs, planned after
    # the videos from the time then left, take up the difference (down to the fewest epochs that learn).
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
    evaluation_seconds: float = 0.0  # the final evaluations, all methods: from the first epoch's validations

    def describe(self) -> str:
        text = (
            f"demo plan for {self.minutes:g} minutes: measured {self.step_seconds:.2f} s/step; "
            f"{self.videos_per_class} videos per class"
        )
        if self.epoch_seconds:
            per_epoch = ", ".join(f"{m} {s:.0f} s/epoch" for m, s in self.epoch_seconds.items())
            text += (
                f"; {per_epoch}; evaluations {self.evaluation_seconds:.0f} s; training {self.epochs} epochs to fit "
                f"{self.minutes:g} minutes"
            )
        return text


def run_demo(cfg: DemoConfig, preset: DemoPreset = DemoPreset()) -> dict:
    with stop_on_signals():
        try:
            return _demo(cfg, preset)
        except Exception as e:
            if (signal := stop_requested()) is None:
                raise
            what = e.what if isinstance(e, Stopped) else f"demo stopped by {signal}"  # e.g. its ffmpeg killed too
            raise Stopped(what, f"run `python cli.py demo --out {cfg.out}` again to continue") from e


def _demo(cfg: DemoConfig, preset: DemoPreset) -> dict:
    started = time.perf_counter()
    deadline = started + cfg.minutes * 60 * (1 - preset.margin)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = ("skd-srl", "baseline") if cfg.compare else ("skd-srl",)
    plan_path = out / "plan.json"
    if plan_path.exists():  # a re-run keeps its plan
        plan = DemoPlan(**json.loads(plan_path.read_text()))
    else:
        plan = _plan_videos(preset, cfg.minutes, resolve_device(cfg.device))
        write_atomic(plan_path, json.dumps(asdict(plan), indent=2) + "\n")
    print(plan.describe(), flush=True)

    data = out / "data"
    if not (data / "manifest.json").exists():
        run_preprocess(
            PreprocessConfig(
                dataset="synthetic",
                out=str(data),
                root=str(out / "videos"),
                classes=preset.classes,
                videos_per_class=plan.videos_per_class,
                workers=os.cpu_count() or 1,
                resume=data.exists(),
            )
        )
    settings = TrainSettings(
        arch=preset.arch,
        data=str(data),
        out=str(out),
        epochs=1,
        batch_size=preset.batch_size,
        device=cfg.device,
        optim=OptimConfig(lr=preset.lr, lr_patience=preset.lr_patience),
    )
    if not plan.epochs:  # one real epoch of each method, where the comparison's runs go on from
        plan.epoch_seconds, validations = {}, 0.0
        for method in methods:
            run_dir = out / "runs" / f"{method}-seed0"
            epoch_started = time.perf_counter()
            train(TrainConfig.of(settings, method=method, seed=0, out=str(run_dir), resume="auto"))
            plan.epoch_seconds[method] = time.perf_counter() - epoch_started
            validations += read_metrics(run_dir)[0]["val_seconds"]
        val_clips = TrainSettings().val_clips
        plan.evaluation_seconds = validations * preset.eval_clips / val_clips  # the same videos, more clips
        plan.epochs = plan_epochs(plan.epoch_seconds, plan.evaluation_seconds, deadline - time.perf_counter(), preset)
        write_atomic(plan_path, json.dumps(asdict(plan), indent=2) + "\n")
        print(plan.describe(), flush=True)
    command = ["python", "cli.py", "demo", "--out", cfg.out, "--minutes", f"{cfg.minutes:g}"]
    comparison = ComparisonPlan(
        replace(settings, epochs=plan.epochs),
        methods,
        clips_per_video=preset.eval_clips,
        command=shlex.join(command + (["--compare"] if cfg.compare else [])),
    )
    table = run_comparison(comparison)
    report = {
        "device": str(resolve_device(cfg.device)),
        "method": methods[0],
        "test_top1": table.runs[0].test_top1,
        "chance": 1 / preset.classes,
        "minutes_budget": cfg.minutes,
        "seconds": time.perf_counter() - started,
        "plan": asdict(plan),
        "rows": [asdict(run) for run in table.runs],
    }
    print(format_demo(report))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def plan_epochs(
    epoch_seconds: dict[str, float], evaluation_seconds: float, seconds_left: float, preset: DemoPreset
) -> int:
    """Epochs for every method (the first one is done) that fit `seconds_left` with the final evaluations."""
    per_epoch = sum(epoch_seconds.values())
    fits = 1 + int(max(0.0, seconds_left - evaluation_seconds) // per_epoch)
    fewest, most = preset.epochs
    if fits < fewest:
        print(f"demo: the budget holds fewer than {fewest} epochs here; training {fewest}, the fewest that learn well")
    return max(fewest, min(most, fits))


def _plan_videos(preset: DemoPreset, minutes: float, device: torch.device) -> DemoPlan:
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
    method = build_method("skd-srl", build_model(preset.arch, preset.classes), preset.classes, ObjectiveConfig())
    precision = resolve_precision("auto", device)  # as the demo's runs train: the defaults
    step = build_train_step(method, OptimConfig(lr=preset.lr), precision, device, channels_last=True)
    clip = ClipConfig()
    shape = (preset.batch_size, 3, clip.length, clip.crop, clip.crop)
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
