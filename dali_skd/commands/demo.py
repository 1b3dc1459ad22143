"""`cli.py demo`: the whole system on the built-in synthetic dataset, within a time budget, on whatever device.

Generates the videos, preprocesses them into shards, trains SKD-SRL with a tiny 3D ResNet, evaluates it with
several clips per video and prints the accuracy against chance. `--compare` also trains the plain cross-entropy
baseline on the same data, within the same budget. The training and evaluation are a comparison
(`comparison.run_comparison`, as `cli.py compare` runs it) of the demo's plan: OUT/table.md, OUT/runs/.

The work is planned from this machine's speed, so that the whole demo ends within `--minutes`:
1. a few training steps on random clips give the seconds per step, from which the number of videos is chosen
   (their preparation takes at most a quarter of the budget);
2. after the videos, each method's trainer is built on the shards and timed, its warm-up apart from its steady
   pace: its first steps (the pipeline built, its first batches decoded) are the warm-up; the steps after them give
   the steady seconds per step, one pass of the validation less its pipeline's build the steady validation, and a
   checkpoint and a plot the rest of an epoch. The epochs are chosen to fill what is left once each run's own
   costs (its trainer's set-up, its pipelines' builds, its first steps, its final evaluation) are paid.
The log reads as one story: the plan, one line an epoch, one table, and what to run next. The plan is kept in
OUT/plan.json; re-running the demo continues where it stopped, after a kill or after a SIGTERM, SIGINT or SIGUSR1,
on which it stops as `train` does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dali_skd.checkpoint import save_checkpoint
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
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.errors import InputError
from dali_skd.evaluation import evaluate
from dali_skd.files import append_line, check_writable, write_atomic
from dali_skd.methods import build_method
from dali_skd.models import build_model
from dali_skd.plot import plot_curves
from dali_skd.runtime import resolve_device, resolve_precision
from dali_skd.settings import setting, settings
from dali_skd.signals import Stopped, stop_on_signals, stop_requested
from dali_skd.step import build_train_step
from dali_skd.training import Trainer
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
    epochs: int = 0  # chosen once the trainers were timed on the shards
    fits: int = 0  # the epochs the budget holds, before the preset's limits
    warmup_seconds: float = 0.0  # the timing's warm-up (all methods): pipelines built, first batches and steps
    step_seconds_on_shards: dict[str, float] | None = None  # each method's steady step on the shards
    epoch_seconds: dict[str, float] | None = None  # each method's steady epoch: steps, validation, checkpoint, plot
    run_seconds: dict[str, float] | None = None  # what each run costs beside its epochs, its final evaluation too

    def describe_videos(self, preset: DemoPreset) -> str:
        fewest, most = preset.videos_per_class
        share = f"{preset.prep_share:.0%} of the budget"
        if self.videos_per_class == fewest and _affordable(preset, self.minutes, self.step_seconds) < fewest:
            made = f", the fewest of {fewest} to {most} ({share} makes fewer here)"
        else:
            made = f" (of {fewest} to {most}), made in at most {share}"
        return (
            f"  a training step on random clips takes {self.step_seconds:.2f} s here: {self.videos_per_class} videos "
            f"per class{made}"
        )

    def describe_epochs(self, preset: DemoPreset) -> str:
        assert self.epoch_seconds and self.run_seconds and self.step_seconds_on_shards
        methods = ", ".join(
            f"{m} {self.step_seconds_on_shards[m]:.2f} s a step, {self.epoch_seconds[m]:.0f} s an epoch"
            for m in self.epoch_seconds
        )
        fewest, most = preset.epochs
        if self.fits < fewest:
            held = f"the budget holds {self.fits}, and {fewest} are the fewest that learn the classes well"
        elif self.fits > most:
            held = f"the budget holds {self.fits}, and more than {most} are not worth training"
        else:
            held = "to fill the budget"
        return (
            f"  on the shards, after {self.warmup_seconds:.0f} s of warm-up (pipelines built, first steps): {methods}, "
            f"validation included; each run's set-up and final evaluation {sum(self.run_seconds.values()):.0f} s: "
            f"training {self.epochs} epochs ({fewest} to {most}), {held}"
        )


WARMUP_STEPS = 2  # the pipeline built, its first batches decoded, the step's first calls: timed apart
TIMED_STEPS = 6  # the steady pace: their median


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
    check_writable(out, "--out")
    if cfg.json:
        check_writable(Path(cfg.json).parent, "--json")
    device = resolve_device(cfg.device)
    methods = ("skd-srl", "baseline") if cfg.compare else ("skd-srl",)
    print(
        f"demo: {preset.classes} classes of synthetic motion (chance {1 / preset.classes:.1%}), "
        f"{' and '.join(methods)} with {preset.arch} on {device}, planned to end within {cfg.minutes:g} minutes",
        flush=True,
    )
    plan_path = out / "plan.json"
    plan = _saved_plan(plan_path) or _plan_videos(preset, cfg.minutes, device)
    write_atomic(plan_path, json.dumps(asdict(plan), indent=2) + "\n")
    print(plan.describe_videos(preset), flush=True)

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
    if not plan.epochs:
        _plan_epochs(plan, settings, methods, preset, out / "timing", deadline)
        write_atomic(plan_path, json.dumps(asdict(plan), indent=2) + "\n")
    print(plan.describe_epochs(preset), flush=True)
    command = ["python", "cli.py", "demo", "--out", cfg.out, "--minutes", f"{cfg.minutes:g}"]
    comparison = ComparisonPlan(
        replace(settings, epochs=plan.epochs),
        methods,
        clips_per_video=preset.eval_clips,
        command=shlex.join(command + (["--compare"] if cfg.compare else [])),
    )
    table = run_comparison(comparison)
    report = {
        "device": str(device),
        "method": methods[0],
        "test_top1": table.runs[0].test_top1,
        "chance": 1 / preset.classes,
        "minutes_budget": cfg.minutes,
        "seconds": time.perf_counter() - started,
        "plan": asdict(plan),
        "rows": [asdict(run) for run in table.runs],
        "test_videos": load_manifest(str(data)).split("test").samples,
        "clips_per_video": preset.eval_clips,
    }
    print(format_demo(report))
    print(next_steps(cfg, table.runs[0].name))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _saved_plan(path: Path) -> DemoPlan | None:
    """The plan of an earlier run of the demo into the same --out: a re-run keeps it."""
    if not path.exists():
        return None
    try:
        return DemoPlan(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise InputError(f"{path} is not a plan this demo wrote ({e}): pass a new --out") from e


def plan_epochs(
    epoch_seconds: dict[str, float], run_seconds: dict[str, float], seconds_left: float, preset: DemoPreset
) -> tuple[int, int]:
    """The epochs every method's run trains, and the epochs `seconds_left` holds once each run's own costs
    (`run_seconds`: set-up, pipelines, final evaluation) are paid, before the preset's limits."""
    fits = int(max(0.0, seconds_left - sum(run_seconds.values())) // sum(epoch_seconds.values()))
    fewest, most = preset.epochs
    return max(fewest, min(most, fits)), fits


def _plan_epochs(
    plan: DemoPlan,
    settings: TrainSettings,
    methods: tuple[str, ...],
    preset: DemoPreset,
    scratch: Path,
    deadline: float,
) -> None:
    """Times each method's trainer on the shards (`time_trainer`) and fills in the plan's epochs."""
    plan.warmup_seconds, plan.step_seconds_on_shards, plan.epoch_seconds, plan.run_seconds = 0.0, {}, {}, {}
    shutil.rmtree(scratch, ignore_errors=True)  # left by a timing a kill cut short
    for method in methods:
        timing = time_trainer(TrainConfig.of(settings, method=method, seed=0, out=str(scratch / method)), preset)
        plan.warmup_seconds += timing.warmup
        plan.step_seconds_on_shards[method] = timing.step
        plan.epoch_seconds[method] = timing.epoch
        plan.run_seconds[method] = timing.run
    shutil.rmtree(scratch, ignore_errors=True)
    plan.epochs, plan.fits = plan_epochs(plan.epoch_seconds, plan.run_seconds, deadline - time.perf_counter(), preset)


@dataclass
class TrainerTiming:
    warmup: float  # seconds: the first steps (the pipeline built, its first batches) beyond the steady pace
    step: float  # the steady seconds per step
    epoch: float  # a steady epoch: its steps, its validation, a checkpoint and a plot
    run: float  # the rest of a run: the trainer's set-up, its first steps' warm-up, the pipelines, the final evaluation


def time_trainer(cfg: TrainConfig, preset: DemoPreset) -> TrainerTiming:
    """The trainer of `cfg` (its loaders, its step) built and timed on the shards, then dropped: nothing is kept."""
    began = time.perf_counter()
    ctx = init_distributed(cfg.device)
    trainer = Trainer.from_config(cfg, ctx)
    setup = time.perf_counter() - began
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
    try:
        times = []
        batches = trainer.train_loader.epoch(0)
        before = time.perf_counter()
        for batch in itertools.islice(batches, WARMUP_STEPS + TIMED_STEPS):
            trainer.train_step(batch.views, batch.labels)
            sync()
            now = time.perf_counter()
            times.append(now - before)
            before = now
        batches.close()
        step = statistics.median(times[WARMUP_STEPS:] or times)
        warmup = max(0.0, sum(times[:WARMUP_STEPS]) - step * min(WARMUP_STEPS, len(times)))
        validated = time.perf_counter()
        evaluate(
            trainer.method.model,
            trainer.val_loader,
            ctx,
            trainer.train_step.precision,
            trainer.train_step.channels_last,
        )
        val_build = trainer.val_loader.build_seconds
        validation = max(0.0, time.perf_counter() - validated - val_build)
        for _ in range(2):  # the second: matplotlib's first figure of the process is slower
            saved = time.perf_counter()
            save_checkpoint(Path(cfg.out) / "last.pt", {"method": trainer.method.trained_state()})
            append_line(Path(cfg.out) / "metrics.jsonl", json.dumps(TIMING_ROW))
            plot_curves(cfg.out)
            bookkeeping = time.perf_counter() - saved
    finally:
        trainer.train_loader.close()
        trainer.val_loader.close()
        shutdown(ctx)
    epoch = trainer.train_loader.steps_per_epoch * step + validation + bookkeeping
    evaluation = val_build + validation * preset.eval_clips / cfg.val_clips  # the same videos, more clips
    return TrainerTiming(warmup + val_build, step, epoch, setup + warmup + val_build + evaluation)


TIMING_ROW = {"epoch": 1, "loss": 1.0, "train_top1": 0.5, "val_top1": 0.5, "lr": 0.01}  # a metrics line, to plot


def _plan_videos(preset: DemoPreset, minutes: float, device: torch.device) -> DemoPlan:
    """Measures a training step of the preset on random clips and picks the number of videos per class whose
    generation and preprocessing fit `prep_share` of the budget (within the preset's limits)."""
    step = measure_step(preset, device)
    fewest, most = preset.videos_per_class
    return DemoPlan(minutes, step, max(fewest, min(most, _affordable(preset, minutes, step))))


def _affordable(preset: DemoPreset, minutes: float, step: float) -> int:
    """The videos per class whose making fits `prep_share` of the budget, at `step` seconds a training step."""
    return math.floor(preset.prep_share * minutes * 60 / (preset.steps_per_video * step * preset.classes))


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
    """The demo's one table: each run's test accuracy against chance, its epochs and its minutes."""
    lines = [
        f"\nSynthetic motion, {report['test_videos']} test videos x {report['clips_per_video']} clips, on "
        f"{report['device']}; chance {report['chance']:.1%}",
        f"{'method':<14}{'test top-1':>12}{'top-5':>9}{'clip top-1':>12}{'epochs':>8}{'minutes':>9}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['method']:<14}{r['test_top1']:>12.1%}{r['test_top5']:>9.1%}{r['clip_top1']:>12.1%}"
            f"{r['epochs']:>8}{r['seconds'] / 60:>9.1f}"
        )
    used = report["seconds"] / 60
    lines.append(
        f"total {used:.1f} minutes of the {report['minutes_budget']:g} budgeted ({used / report['minutes_budget']:.0%})"
    )
    return "\n".join(lines)


def next_steps(cfg: DemoConfig, run: str) -> str:
    """What a newcomer may run next: the model just trained, evaluated as `eval` does; the baseline beside it; a
    real dataset."""
    data, best = f"{cfg.out}/data", f"{cfg.out}/runs/{run}/best.pt"
    lines = [
        "\nnext:",
        f"  python cli.py eval --data {data} --checkpoint {best} --spatial-crops 3 --json {cfg.out}/eval.json"
        "   # per-class accuracy, confusion matrix",
        f"  python cli.py preview --data {data} --samples 2 --out {cfg.out}/views.png   # what the loader feeds",
    ]
    if not cfg.compare:
        lines.append(
            f"  python cli.py demo --compare --out {cfg.out}-compare   # the plain cross-entropy baseline beside it"
        )
    lines.append(
        "  python cli.py preprocess --dataset ucf101 --root UCF-101 --splits-dir ucfTrainTestlist --out data/ucf101"
        "   # then train on it: README.md, Real datasets"
    )
    return "\n".join(lines)
