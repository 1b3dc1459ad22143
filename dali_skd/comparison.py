"""The comparison engine: every method x seed of a `ComparisonPlan` trained with the same settings, each best
checkpoint evaluated as `eval` evaluates one, and the table written. `cli.py compare` (the paper's Table II) and
`cli.py demo` hand it their plans.

The table: mean +- std of video-level top-1 and top-5 per method, each run's figures and wall time, and the exact
command. The `kd` baseline needs a teacher: unless the settings name one (`--teacher`), a `teacher_arch` model is
trained first (with cross-entropy and the augmentations), and its own accuracy goes into the table too.

DIR (the settings' `out`) after a comparison:

    DIR/table.md, DIR/table.json    the table
    DIR/compare.png                 validation top-1 per epoch: one colour per method, a thin line per seed
    DIR/runs/<method>-seed<k>/      each run's directory (`cli.py train`'s), plus result.json once evaluated
    DIR/runs/teacher/               the kd teacher, when the comparison trained it
    DIR/tracker.json                with `--track.to wandb|mlflow`: the comparison's tracked run (its table)

Tracked (`--track.to`), the runs are grouped under `--track.group` (default: DIR's name) and each gets its test
figures; the group's run gets the table (`tracking.py`).

A run whose result.json exists is reused, and an interrupted run resumes from its last.pt: a killed comparison
started again trains only what is missing. A SIGTERM, SIGINT or SIGUSR1 stops it as it stops `train` (the run in
training saves where it is; between runs, before the next), and the table is not written. DIR/.lock keeps a second
comparison out of DIR while one runs. A finished run asked for more epochs is trained on from its last.pt
(the plateau schedule makes that the same run as one trained for them from the start), and one asked for fewer is
refused. The teacher is never trained on: the kd runs in DIR learnt from it as it is.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

from dali_skd.checkpoint import RESUMABLE_CHANGES
from dali_skd.config import TrainConfig, TrainSettings, changed_settings, format_changes, load_json, to_dict
from dali_skd.distributed import DistContext, init_distributed, shutdown
from dali_skd.evaluation import evaluate_checkpoint
from dali_skd.files import write_atomic
from dali_skd.methods import METHODS
from dali_skd.plot import read_metrics
from dali_skd.signals import Stopped, stop_on_signals
from dali_skd.tracking import check_tracking, open_tracker
from dali_skd.training import Trainer, agreed_stop, main_rank_lock

TEACHER_METHOD = "baseline-aug"  # how a kd teacher is trained: cross-entropy with the paper's augmentations
SUMMARY = ("top1_mean", "top1_std", "top5_mean", "top5_std")  # per method, to the comparison's tracked run


@dataclass(frozen=True)
class ComparisonPlan:
    """What to compare: `methods` x `seeds` runs of `settings` (its `out`: the comparison's folder), each evaluated
    with `clips_per_video` clips per video; a kd teacher, when none is named, of `teacher_arch` (default r3d50,
    r3d50-tiny for -tiny students) trained for `teacher_epochs` (default the settings' epochs). `command` is what
    the table says reproduces it."""

    settings: TrainSettings
    methods: tuple[str, ...]
    seeds: int = 1
    teacher_arch: str | None = None
    teacher_epochs: int | None = None
    clips_per_video: int = 10
    command: str = ""


@dataclass
class RunResult:
    name: str
    method: str
    seed: int
    test_top1: float
    test_top5: float
    clip_top1: float
    best_epoch: int
    epochs: int
    seconds: float  # training and evaluation
    arch: str


@dataclass
class CompareReport:
    command: str
    data: str
    arch: str
    epochs: int
    runs: list[RunResult]
    teacher: RunResult | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # per method: mean and std over seeds
    seconds: float = 0.0


def run_comparison(plan: ComparisonPlan) -> CompareReport:
    """Trains and evaluates every run of `plan` (one process per GPU under torchrun, the runs one after another),
    then writes the table and the plot (rank 0)."""
    base, out = plan.settings, Path(plan.settings.out)
    unknown = [m for m in plan.methods if m not in METHODS]
    if unknown or not plan.methods:
        raise ValueError(
            f"compare: unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}"
        )
    check_tracking(base.track)
    started = time.perf_counter()
    if base.track.to != "tensorboard":  # the comparison's runs, grouped
        base = replace(base, track=replace(base.track, group=base.track.group or out.resolve().name))
    track = base.track
    ctx = init_distributed(base.device)
    held = ExitStack()
    try:
        held.enter_context(stop_on_signals())
        held.enter_context(main_rank_lock(ctx, out))
        teacher_path, teacher = base.teacher, None
        if "kd" in plan.methods and teacher_path is None:
            arch = plan.teacher_arch or ("r3d50-tiny" if base.arch.endswith("-tiny") else "r3d50")
            teacher_cfg = TrainConfig.of(
                base, method=TEACHER_METHOD, seed=0, arch=arch, epochs=plan.teacher_epochs or base.epochs,
                shortcut=None, init=None, freeze="none", optim=replace(base.optim, lr_backbone=1.0),
            )  # fmt: skip
            teacher = _run(plan, teacher_cfg, out / "runs" / "teacher", "teacher", ctx, train_on="--teacher-epochs")
            teacher_path = str(out / "runs" / "teacher" / "best.pt")
        runs = []
        for method in plan.methods:
            for seed in range(plan.seeds):
                name = f"{method}-seed{seed}"
                run_cfg = TrainConfig.of(
                    base, method=method, seed=seed, teacher=teacher_path if method == "kd" else None
                )
                runs.append(_run(plan, run_cfg, out / "runs" / name, name, ctx))
        report = CompareReport(plan.command, base.data, base.arch, base.epochs, runs, teacher)
        report.rows = summarise(runs, plan.methods)
        report.seconds = time.perf_counter() - started
        if ctx.is_main:
            write_report(report, out)
            print(format_table(report))
            with open_tracker(track, out, track.group, {"command": plan.command, **to_dict(base)}, "compare") as t:
                t.summary({f"{row['method']}/{k}": row[k] for row in report.rows for k in SUMMARY if k in row})
                t.files(out / "table.md", out / "table.json", out / "compare.png")
        return report
    except Stopped as e:
        raise Stopped(e.what, "run the same command again to continue: the runs it finished are kept") from e
    finally:
        shutdown(ctx)
        held.close()


def _run(
    plan: ComparisonPlan,
    train_cfg: TrainConfig,
    run_dir: Path,
    name: str,
    ctx: DistContext,
    train_on: str | None = None,
) -> RunResult:
    """One run: reused if it has its result.json (and was made with these settings), resumed if it has a
    last.pt, else trained from the start; then its best checkpoint evaluated with `eval`'s protocol.

    A finished run asked for more epochs is trained on, unless `train_on` names the flag that must keep its
    epochs instead (the teacher's); one asked for fewer epochs is refused."""
    train_cfg = replace(train_cfg, out=str(run_dir), resume="auto")
    result_path = run_dir / "result.json"
    if signal := agreed_stop(ctx):
        raise Stopped(f"compare stopped by {signal} before {name}")
    ctx.barrier()  # every rank decides from the same files
    earlier = 0.0  # seconds of a finished run trained on
    if result_path.exists():
        _check_same_settings(run_dir, train_cfg)
        done = RunResult(**json.loads(result_path.read_text()))
        if done.epochs == train_cfg.epochs:
            if ctx.is_main:
                print(f"compare: {name} done before, reusing {result_path}")
            return done
        if done.epochs > train_cfg.epochs or train_on is not None:
            flag = train_on or "--epochs"
            raise ValueError(
                f"{run_dir} was trained for {done.epochs} epochs, not {train_cfg.epochs}: pass {flag} "
                f"{done.epochs} to reuse it, or a new --out"
            )
        if ctx.is_main:
            print(f"compare: {name} was trained for {done.epochs} epochs; training it on to {train_cfg.epochs}")
        earlier = done.seconds
    if ctx.is_main:
        print(f"compare: training {name} -> {run_dir}", flush=True)
    started = time.perf_counter() - earlier
    summary = Trainer.from_config(train_cfg, ctx).run()
    result, loader = evaluate_checkpoint(
        run_dir / "best.pt", train_cfg.data, ctx, amp=train_cfg.amp, batch_size=train_cfg.batch_size,
        clips_per_video=plan.clips_per_video, loader=train_cfg.loader, shards=train_cfg.eval_shards,
    )  # fmt: skip
    loader.close()
    run = RunResult(
        name=name,
        method=train_cfg.method,
        seed=train_cfg.seed,
        test_top1=result.video_top1,
        test_top5=result.video_top5,
        clip_top1=result.clip_top1,
        best_epoch=summary.best_epoch,
        epochs=train_cfg.epochs,
        seconds=time.perf_counter() - started,
        arch=train_cfg.arch,
    )
    if ctx.is_main:
        write_atomic(result_path, json.dumps(asdict(run), indent=2) + "\n")
        with open_tracker(train_cfg.track, run_dir, name, to_dict(train_cfg), "train") as tracked:
            tracked.summary({"test_top1": run.test_top1, "test_top5": run.test_top5, "test_clip_top1": run.clip_top1})
    return run


def _check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """A finished run is reused only if it was trained with `cfg` (up to what a resume may change)."""
    saved = to_dict(load_json(TrainConfig, run_dir / "config.json"))
    refused = {k: v for k, v in changed_settings(saved, to_dict(cfg)).items() if k not in RESUMABLE_CHANGES}
    if refused:
        raise ValueError(
            f"{run_dir} was trained with other settings ({format_changes(refused)}): compare with the same "
            "settings to reuse it, or pass a new --out"
        )


def summarise(runs: list[RunResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: mean and (sample) standard deviation over its seeds of test top-1 and top-5."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        top1, top5 = [r.test_top1 for r in mine], [r.test_top5 for r in mine]
        rows.append(
            {
                "method": method,
                "runs": len(mine),
                "top1_mean": statistics.mean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "top5_mean": statistics.mean(top5),
                "top5_std": statistics.stdev(top5) if len(top5) > 1 else 0.0,
                "minutes": sum(r.seconds for r in mine) / 60,
            }
        )
    return rows


def format_table(report: CompareReport) -> str:
    lines = [
        f"Video-level test accuracy, {report.arch}, {report.epochs} epochs, data {report.data}; "
        f"mean +- std over {max((r['runs'] for r in report.rows), default=0)} seed(s)",
        "",
        "| method | top-1 (%) | top-5 (%) | runs | minutes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in report.rows:
        lines.append(
            f"| {row['method']} | {100 * row['top1_mean']:.1f} +- {100 * row['top1_std']:.1f} | "
            f"{100 * row['top5_mean']:.1f} +- {100 * row['top5_std']:.1f} | {row['runs']} | {row['minutes']:.1f} |"
        )
    if report.teacher is not None:
        t = report.teacher
        lines.append(f"| (kd teacher: {t.arch}, {TEACHER_METHOD}, {t.epochs} epochs) | "
                     f"{100 * t.test_top1:.1f} | {100 * t.test_top5:.1f} | 1 | {t.seconds / 60:.1f} |")  # fmt: skip
    lines += ["", "| run | top-1 (%) | top-5 (%) | clip top-1 (%) | best epoch | minutes |", "|---" * 6 + "|"]
    for r in report.runs:
        lines.append(
            f"| {r.name} | {100 * r.test_top1:.1f} | {100 * r.test_top5:.1f} | {100 * r.clip_top1:.1f} | "
            f"{r.best_epoch} | {r.seconds / 60:.1f} |"
        )
    lines += ["", f"Total {report.seconds / 60:.1f} minutes. Command:", "", f"    {report.command}"]
    return "\n".join(lines)


def write_report(report: CompareReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.md", format_table(report) + "\n")
    write_atomic(out / "table.json", json.dumps(asdict(report), indent=2) + "\n")
    plot_comparison(report, out / "compare.png", out / "runs")


def plot_comparison(report: CompareReport, path: Path, runs_dir: Path) -> Path:
    """Validation top-1 per epoch: one colour per method, a thin line per seed, a thick one for their mean."""
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for i, row in enumerate(report.rows):
        curves = []
        for run in (r for r in report.runs if r.method == row["method"]):
            metrics = read_metrics(runs_dir / run.name)
            curves.append([100 * m["val_top1"] for m in metrics])
            ax.plot([m["epoch"] for m in metrics], curves[-1], color=colours(i), lw=0.8, alpha=0.5)
        length = min(len(c) for c in curves)
        mean = [statistics.mean(c[e] for c in curves) for e in range(length)]
        label = f"{row['method']} ({100 * row['top1_mean']:.1f}% test)"
        ax.plot(range(1, length + 1), mean, color=colours(i), lw=2.2, label=label)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=f"{report.arch} on {report.data}", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
