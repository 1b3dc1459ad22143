"""The comparison engine: every method x seed of a `ComparisonPlan` trained with the same settings, each best
checkpoint evaluated as `eval` evaluates one, and the table written with its verdicts. `cli.py compare` (the
paper's Table II) and `cli.py demo` hand it their plans.

The table: per row (a method, or a method under a variant of one setting: `--vary objective.alpha=0,1`), the mean
video-level test top-1 with its 95% confidence interval over seeds, top-5, validation top-1, minutes of wall and CPU
time; the verdicts (`verdicts.py`): each method against the reference (`baseline`), `skd-srl` against `self-kd`,
and each variant against its method's base row, paired by seed; which videos picked best.pt (the validation
protocol), the clips and the stored frames; each run's figures; the exact command. The `kd` baseline needs a
teacher: unless the settings name one (`--teacher`), one is trained first (`teacher_choice`), and the table gives
its accuracy beside the student baseline's, in words when it is below it.

DIR (the settings' `out`) after a comparison:

    DIR/table.md, DIR/table.json    the table
    DIR/compare.png                 validation top-1 per epoch: one colour per row, a thin line per seed
    DIR/runs/<method>-seed<k>/      each run's directory (`cli.py train`'s), plus result.json once evaluated
    DIR/runs/<method>@<setting>=<value>-seed<k>/    a variant's runs
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
import logging
import math
import os
import resource
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

from dali_skd.checkpoint import RESUMABLE_CHANGES, TrainedRun
from dali_skd.config import TrainConfig, TrainSettings, changed_settings, format_changes, load_json, to_dict
from dali_skd.data.holdout import protocol
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import DistContext, init_distributed, shutdown
from dali_skd.errors import ConfigError
from dali_skd.evaluation import EvalResult, evaluate_checkpoint
from dali_skd.files import write_atomic
from dali_skd.methods import METHODS
from dali_skd.plot import read_metrics
from dali_skd.runtime import machine_name
from dali_skd.signals import Stopped, stop_on_signals
from dali_skd.tracking import check_tracking, open_tracker
from dali_skd.training import Trainer, agreed_stop, main_rank_lock
from dali_skd.verdicts import Paired, estimate, paired

SUMMARY = ("top1_mean", "top1_std", "top5_mean", "top5_std")  # per row, to the comparison's tracked run


@dataclass(frozen=True)
class Teacher:
    """The kd teacher a comparison trains when none is given."""

    arch: str
    method: str
    epochs: int


def teacher_choice(student_arch: str, epochs: int) -> Teacher:
    """The default teacher for students of `student_arch` trained for `epochs`. For the -tiny models, chosen by
    measurement on the built-in hard set (docs/benchmarks.md, "A teacher for kd"): the students' own network
    trained with SKD-SRL for twice their epochs had the best validation top-1 of four candidates, above the students'
    baseline, where the earlier default, an r3d50-tiny with cross-entropy and the augmentations for their epochs,
    reached less than half of it. For the full models (not measured here), the paper's kind of teacher: a deeper
    network, r3d50, with cross-entropy and the augmentations for the students' epochs."""
    if student_arch.endswith("-tiny"):
        return Teacher(student_arch, "skd-srl", 2 * epochs)
    return Teacher("r3d50", "baseline-aug", epochs)


@dataclass(frozen=True)
class Variant:
    """Every method of a comparison again with one setting changed: `name` says which and to what
    (`objective.alpha=0`), `settings` are the comparison's with that change."""

    name: str
    settings: TrainSettings


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComparisonPlan:
    """What to compare: `methods` x `seeds` runs of `settings` (its `out`: the comparison's folder), and again under
    each of `variants`, each evaluated with `clips_per_video` clips per video; a kd teacher, when none is named,
    as `teacher_choice` says unless `teacher_arch`, `teacher_method`, `teacher_epochs` say otherwise. Each method is
    compared with `reference` (when it is one of them; else the first method). `command` is what the table says
    reproduces it."""

    settings: TrainSettings
    methods: tuple[str, ...]
    seeds: int = 1
    teacher_arch: str | None = None
    teacher_epochs: int | None = None
    clips_per_video: int = 10
    command: str = ""
    teacher_method: str | None = None
    reference: str = "baseline"
    variants: tuple[Variant, ...] = ()

    def teacher(self) -> Teacher:
        chosen = teacher_choice(self.settings.arch, self.settings.epochs)
        return Teacher(
            self.teacher_arch or chosen.arch, self.teacher_method or chosen.method, self.teacher_epochs or chosen.epochs
        )


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
    variant: str = ""  # the `Variant` it ran under; "" for the comparison's own settings
    val_top1: float | None = None  # the best validation top-1, which picked best.pt (None: not known)
    cpu_seconds: float | None = None  # of this process, its threads and children, training and evaluation
    load: float | None = None  # the machine's 5-minute load average as the run ended
    validation: str = ""  # which videos picked its best.pt (`holdout.protocol`); "" in runs before it was kept
    machine: str = ""  # the kind of machine it trained on (`runtime.machine_name`); "" in runs before it was kept

    @property
    def row(self) -> str:
        return row_name(self.method, self.variant)


def row_name(method: str, variant: str) -> str:
    return f"{method} [{variant}]" if variant else method


def run_name(method: str, variant: str, seed: int) -> str:
    return f"{method}@{variant.replace('/', '_')}-seed{seed}" if variant else f"{method}-seed{seed}"


@dataclass
class CompareReport:
    command: str
    data: str
    arch: str
    epochs: int
    runs: list[RunResult]
    teacher: RunResult | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # per row: mean, interval and spread over seeds
    seconds: float = 0.0
    validation: str = ""  # which videos picked best.pt (`holdout.protocol`)
    inputs: str = ""  # the clips and the stored frames the runs saw
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # `Paired.to_json` of each pair compared
    notes: list[str] = field(default_factory=list)  # what a row means, in words (a kd teacher below the baseline)
    cpu_seconds: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the machine's load averages as the table was written


def cpu_seconds() -> float:
    """User and system CPU time of this process (all its threads: DALI's, PyTorch's) and its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_comparison(plan: ComparisonPlan) -> CompareReport:
    """Trains and evaluates every run of `plan` (one process per GPU under torchrun, the runs one after another),
    then writes the table and the plot (rank 0); the caller prints what it wants of the report."""
    base, out = plan.settings, Path(plan.settings.out)
    unknown = [m for m in plan.methods if m not in METHODS]
    if unknown or not plan.methods:
        raise ConfigError(
            f"compare: unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}"
        )
    check_tracking(base.track)
    started, cpu_started = time.perf_counter(), cpu_seconds()
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
            chosen = plan.teacher()
            teacher_cfg = TrainConfig.of(
                base, method=chosen.method, seed=0, arch=chosen.arch, epochs=chosen.epochs, shortcut=None, init=None,
                freeze="none", optim=replace(base.optim, lr_backbone=1.0),
            )  # fmt: skip
            teacher = _run(plan, teacher_cfg, out / "runs" / "teacher", "teacher", ctx, train_on="--teacher-epochs")
            teacher_path = str(out / "runs" / "teacher" / "best.pt")
        elif "kd" in plan.methods:
            teacher = _given_teacher(plan, teacher_path, ctx)
        runs = []
        for variant in (Variant("", base), *plan.variants):
            for method in plan.methods:
                for seed in range(plan.seeds):
                    name = run_name(method, variant.name, seed)
                    run_cfg = TrainConfig.of(
                        variant.settings, method=method, seed=seed, teacher=teacher_path if method == "kd" else None
                    )
                    runs.append(_run(plan, run_cfg, out / "runs" / name, name, ctx, variant=variant.name))
        report = CompareReport(plan.command, base.data, base.arch, base.epochs, runs, teacher)
        report.rows = summarise(runs, plan.methods, [v.name for v in plan.variants])
        report.verdicts = [p.to_json() for p in compared_pairs(runs, plan)]
        report.notes = teacher_notes(report)
        report.validation = validation_protocol(runs, base.val_fraction)
        report.inputs = describe_inputs(base)
        report.seconds, report.cpu_seconds = time.perf_counter() - started, cpu_seconds() - cpu_started
        report.load = os.getloadavg()
        if ctx.is_main:
            write_report(report, out)
            with open_tracker(track, out, track.group, {"command": plan.command, **to_dict(base)}, "compare") as t:
                t.summary({f"{row['row']}/{k}": row[k] for row in report.rows for k in SUMMARY if k in row})
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
    variant: str = "",
) -> RunResult:
    """One run: reused if it has its result.json (and was made with these settings), resumed if it has a
    last.pt, else trained from the start; then its best checkpoint evaluated with `eval`'s protocol.

    A finished run asked for more epochs is trained on, unless `train_on` names the flag that must keep its
    epochs instead (the teacher's); one asked for fewer epochs is refused."""
    train_cfg = replace(train_cfg, out=str(run_dir), resume=(run_dir / "last.pt").exists())  # no --resume said
    result_path = run_dir / "result.json"
    if signal := agreed_stop(ctx):
        raise Stopped(f"compare stopped by {signal} before {name}")
    ctx.barrier()  # every rank decides from the same files
    earlier, earlier_cpu = 0.0, 0.0  # of a finished run trained on
    if result_path.exists():
        _check_same_settings(run_dir, train_cfg)
        done = RunResult(**json.loads(result_path.read_text()))
        if done.epochs == train_cfg.epochs:
            if ctx.is_main:
                log.info("compare: %s done before, reusing %s", name, result_path)
            return done
        if done.epochs > train_cfg.epochs or train_on is not None:
            flag = train_on or "--epochs"
            raise ConfigError(
                f"{run_dir} was trained for {done.epochs} epochs, not {train_cfg.epochs}: pass {flag} "
                f"{done.epochs} to reuse it, or a new --out"
            )
        if ctx.is_main:
            log.info("compare: %s was trained for %d epochs; training it on to %d", name, done.epochs, train_cfg.epochs)
        earlier, earlier_cpu = done.seconds, done.cpu_seconds or 0.0
    if ctx.is_main:
        log.info("compare: training %s -> %s", name, run_dir)
    started, cpu_started = time.perf_counter() - earlier, cpu_seconds() - earlier_cpu
    summary = Trainer.from_config(train_cfg, ctx).run()
    if ctx.is_main:
        log.info(summary.format())
    result = _evaluate(plan, run_dir / "best.pt", train_cfg, ctx)
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
        variant=variant,
        val_top1=summary.best_top1,
        cpu_seconds=cpu_seconds() - cpu_started,
        load=os.getloadavg()[1],
        validation=summary.validation,
        machine=machine_name(ctx.device, ctx.world),
    )
    if ctx.is_main:
        write_atomic(result_path, json.dumps(asdict(run), indent=2) + "\n")
        with open_tracker(train_cfg.track, run_dir, name, to_dict(train_cfg), "train") as tracked:
            tracked.summary({"test_top1": run.test_top1, "test_top5": run.test_top5, "test_clip_top1": run.clip_top1})
    return run


def _evaluate(plan: ComparisonPlan, checkpoint: Path, cfg: TrainSettings, ctx: DistContext) -> EvalResult:
    """`eval`'s figures of `checkpoint` on the test split."""
    result, loader = evaluate_checkpoint(
        checkpoint, cfg.data, ctx, amp=cfg.amp, batch_size=cfg.batch_size, clips_per_video=plan.clips_per_video,
        loader=cfg.loader, shards=cfg.eval_shards,
    )  # fmt: skip
    loader.close()
    return result


def _given_teacher(plan: ComparisonPlan, path: str, ctx: DistContext) -> RunResult:
    """A teacher named by `--teacher`, evaluated on the test split as the runs are (its validation figure is not
    known here: it may have been trained on every training video)."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    trained = TrainedRun.load(path).config
    result = _evaluate(plan, Path(path), plan.settings, ctx)
    return RunResult(
        name="teacher", method=trained.method, seed=trained.seed, test_top1=result.video_top1,
        test_top5=result.video_top5, clip_top1=result.clip_top1, best_epoch=0, epochs=trained.epochs,
        seconds=time.perf_counter() - started, arch=trained.arch, cpu_seconds=cpu_seconds() - cpu_started,
        load=os.getloadavg()[1],
    )  # fmt: skip


def _check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """A finished run is reused only if it was trained with `cfg` (up to what a resume may change)."""
    saved = to_dict(load_json(TrainConfig, run_dir / "config.json"))
    refused = {k: v for k, v in changed_settings(saved, to_dict(cfg)).items() if k not in RESUMABLE_CHANGES}
    if refused:
        raise ConfigError(
            f"{run_dir} was trained with other settings ({format_changes(refused)}): compare with the same "
            "settings to reuse it, or pass a new --out"
        )


# -- the table --------------------------------------------------------------------------------------------------------


def summarise(runs: list[RunResult], methods: Sequence[str], variants: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per row (each method, then each method under each variant): over its seeds, the mean of test top-1 with its
    95% interval and standard deviation, top-5's mean and standard deviation, the mean validation top-1, minutes."""
    rows = []
    for variant in ("", *variants):
        for method in methods:
            mine = [r for r in runs if r.method == method and r.variant == variant]
            top1, top5 = estimate([r.test_top1 for r in mine]), estimate([r.test_top5 for r in mine])
            validated = [r.val_top1 for r in mine if r.val_top1 is not None]
            rows.append(
                {
                    "row": row_name(method, variant),
                    "method": method,
                    "variant": variant,
                    "runs": len(mine),
                    "top1_mean": top1.mean,
                    "top1_low": top1.low,
                    "top1_high": top1.high,
                    "top1_std": top1.std or 0.0,
                    "top5_mean": top5.mean,
                    "top5_std": top5.std or 0.0,
                    "val_top1_mean": statistics.mean(validated) if len(validated) == len(mine) else None,
                    "minutes": sum(r.seconds for r in mine) / 60,
                    "cpu_minutes": sum(r.cpu_seconds or 0.0 for r in mine) / 60,
                }
            )
    return rows


def reference_of(plan: ComparisonPlan) -> str:
    """The method every other one is compared with: the plan's reference, or its first method without it."""
    return plan.reference if plan.reference in plan.methods else plan.methods[0]


def compared_pairs(runs: list[RunResult], plan: ComparisonPlan) -> list[Paired]:
    """Within each variant (and the comparison's own settings): every method against the reference, and skd-srl
    against self-kd; then each variant's row against the same method's base row. Paired by seed."""
    by_row: dict[str, dict[int, float]] = {}
    for r in runs:
        by_row.setdefault(r.row, {})[r.seed] = r.test_top1
    reference = reference_of(plan)
    pairs: list[tuple[str, str]] = []
    variants = ["", *(v.name for v in plan.variants)]
    for variant in variants:
        pairs += [(row_name(m, variant), row_name(reference, variant)) for m in plan.methods if m != reference]
        if {"skd-srl", "self-kd"} <= set(plan.methods) and reference not in ("skd-srl", "self-kd"):
            pairs.append((row_name("skd-srl", variant), row_name("self-kd", variant)))
    pairs += [(row_name(m, variant), m) for variant in variants[1:] for m in plan.methods]
    return [paired(first, by_row[first], second, by_row[second]) for first, second in pairs]


def teacher_notes(report: CompareReport) -> list[str]:
    """What the kd rows mean: their teacher's accuracy beside the student baseline's, in words when it is below it
    (validation top-1 when compare trained the teacher; a given one's only known figure is its test top-1)."""
    t = report.teacher
    if t is None:
        return []
    student = "baseline" if any(r["method"] == "baseline" for r in report.rows) else None
    measured = "validation" if t.val_top1 is not None else "test"
    mine = t.val_top1 if t.val_top1 is not None else t.test_top1
    notes = []
    for row in report.rows:
        if row["method"] != "kd":
            continue
        teacher = f"its teacher ({t.arch}, {t.method}, {t.epochs} epochs)"
        said = f"{row['row']}: {teacher} reached {100 * mine:.1f}% {measured}"
        base = next((r for r in report.rows if r["method"] == student and r["variant"] == row["variant"]), None)
        theirs = None if base is None else base["val_top1_mean"] if measured == "validation" else base["top1_mean"]
        if theirs is None:
            notes.append(f"{said} top-1; no baseline ran beside it to say whether it is the better model")
            continue
        said += f" top-1, the student's {base['row']} {100 * theirs:.1f}%"
        if math.isclose(mine, theirs, abs_tol=1e-9):  # a mean of counts of videos: equal but for rounding
            said += ": level with it, not a better model by this measure"
        elif mine < theirs:
            row["note"] = "teacher below the student's baseline"
            said += (
                ": the teacher is BELOW the student's own baseline, so this row distils from a weaker model than the "
                "student becomes alone; it is not the paper's KD (give a better teacher with --teacher, or "
                "--teacher-arch, --teacher-method, --teacher-epochs)"
            )
        notes.append(said)
    return notes


def validation_protocol(runs: list[RunResult], fraction: float) -> str:
    """Which videos picked the runs' best.pt, as their trainers said it (whole groups of clips or single videos);
    `protocol(fraction)` for runs finished before it was kept, and a warning where the runs differ in it."""
    said = sorted({run.validation for run in runs if run.validation})
    if not said:
        return protocol(fraction)
    if len(said) == 1:
        return said[0]
    return "the runs picked best.pt differently (a dataset changed, or runs from another version): " + "; ".join(said)


def describe_inputs(settings: TrainSettings) -> str:
    """The clips the runs saw and how their frames were stored (the dataset's manifest)."""
    clip = settings.clip
    every = f" taken every {clip.frame_stride} frames" if clip.frame_stride > 1 else ""
    stored = ""
    try:
        m = load_manifest(settings.data, settings.loader.read_timeout)
        per = f", {m.frames_per_jpeg} frames per JPEG" if m.format == "jpeg" else ""
        stored = f"; frames stored at short side {m.short_side}, {m.format} quality {m.quality}{per}"
    except (OSError, ValueError):  # the runs read it: only a manifest changed since could fail here
        stored = "; the dataset's manifest could not be read again"
    return f"clips of {clip.length} frames{every}, {clip.crop}x{clip.crop} crops{stored}"


def machines_line(runs: list[RunResult]) -> list[str]:
    """Which kind of machine trained the runs: one line, and a warning where they came from several (the same seed
    trains to other figures on another GPU or CPU, so a pair's difference is then the machine's too)."""
    counts: dict[str, int] = {}
    for run in runs:
        if run.machine:
            counts[run.machine] = counts.get(run.machine, 0) + 1
    if len(counts) <= 1:
        return [f"Trained on {machine}" for machine in counts]
    said = "; ".join(f"{machine} ({n} run{'s' * (n != 1)})" for machine, n in sorted(counts.items()))
    return [
        f"WARNING: the runs were trained on {len(counts)} kinds of machine: {said}. A seed trains to other figures "
        "on another kind, so the paired verdicts mix the machines' differences with the methods': for verdicts, "
        "train every run on one kind (a new --out, or move the runs of the other kind away)"
    ]


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def format_table(report: CompareReport) -> str:
    seeds = max((r["runs"] for r in report.rows), default=0)
    lines = [
        f"Video-level test accuracy, {report.arch}, {report.epochs} epochs, data {report.data}; mean and 95% "
        f"confidence interval over {seeds} seed{'s' * (seeds != 1)}",
        f"{report.validation[:1].upper()}{report.validation[1:]}; {report.inputs}",
        *machines_line(report.runs),
        "",
        "| method | top-1 (%) | top-5 (%) | validation top-1 (%) | runs | minutes | CPU minutes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.rows:
        top1 = estimate_cell(row)
        name = f"{row['row']} ({row['note']})" if row.get("note") else row["row"]
        lines.append(
            f"| {name} | {top1} | {_cell(row['top5_mean'])} +- {_cell(row['top5_std'])} | "
            f"{_cell(row['val_top1_mean'])} | {row['runs']} | {row['minutes']:.1f} | {row['cpu_minutes']:.1f} |"
        )
    if report.teacher is not None:
        t = report.teacher
        lines.append(
            f"| (kd teacher: {t.arch}, {t.method}, {t.epochs} epochs) | {_cell(t.test_top1)} | {_cell(t.test_top5)} | "
            f"{_cell(t.val_top1)} | 1 | {t.seconds / 60:.1f} | {(t.cpu_seconds or 0) / 60:.1f} |"
        )
    if report.verdicts:
        test = "Student's paired t-test, two-sided, 5%; each pair alone"
        lines += ["", f"Verdicts on test top-1, paired by seed ({test}):", ""]
        lines += [f"- {v['sentence']}" for v in report.verdicts]
    if report.notes:
        lines += ["", *(f"Note: {note}." for note in report.notes)]
    lines += [
        "",
        "| run | top-1 (%) | top-5 (%) | clip top-1 (%) | validation top-1 (%) | best epoch | minutes | CPU minutes "
        "| load |",
        "|---" * 9 + "|",
    ]
    for r in report.runs:
        load = "-" if r.load is None else f"{r.load:.1f}"
        lines.append(
            f"| {r.name} | {_cell(r.test_top1)} | {_cell(r.test_top5)} | {_cell(r.clip_top1)} | {_cell(r.val_top1)} | "
            f"{r.best_epoch} | {r.seconds / 60:.1f} | {(r.cpu_seconds or 0) / 60:.1f} | {load} |"
        )
    load = " ".join(f"{x:.1f}" for x in report.load)
    every = [*report.runs, *([report.teacher] if report.teacher else [])]
    minutes, cpu = sum(r.seconds for r in every) / 60, sum(r.cpu_seconds or 0 for r in every) / 60
    lines += [
        "",
        f"The runs took {minutes:.1f} minutes and {cpu:.1f} "
        f"CPU minutes (their process and its threads; a run's load: the 5-minute load average as it ended); this "
        f"command {report.seconds / 60:.1f} minutes and {report.cpu_seconds / 60:.1f} CPU minutes (runs done before "
        f"were reused), load average {load} at its end. Command:",
        "",
        f"    {report.command}",
    ]
    return "\n".join(lines)


def estimate_cell(row: dict[str, Any]) -> str:
    """`47.9 (45.1 to 50.7)`, or `47.9 (1 seed: no interval)`."""
    if row["top1_low"] is None:
        return f"{_cell(row['top1_mean'])} (1 seed: no interval)"
    return f"{_cell(row['top1_mean'])} ({_cell(row['top1_low'])} to {_cell(row['top1_high'])})"


def write_report(report: CompareReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.md", format_table(report) + "\n")
    write_atomic(out / "table.json", json.dumps(asdict(report), indent=2) + "\n")
    plot_comparison(report, out / "compare.png", out / "runs")


def plot_comparison(report: CompareReport, path: Path, runs_dir: Path) -> Path:
    """Validation top-1 per epoch: one colour per row, a thin line per seed, a thick one for their mean."""
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    colours = plt.get_cmap("tab10" if len(report.rows) <= 10 else "tab20")
    for i, row in enumerate(report.rows):
        curves = []
        for run in (r for r in report.runs if r.row == row["row"]):
            metrics = read_metrics(runs_dir / run.name)
            curves.append([100 * m["val_top1"] for m in metrics])
            ax.plot([m["epoch"] for m in metrics], curves[-1], color=colours(i), lw=0.8, alpha=0.5)
        length = min(len(c) for c in curves)
        mean = [statistics.mean(c[e] for c in curves) for e in range(length)]
        label = f"{row['row']} ({100 * row['top1_mean']:.1f}% test)"
        ax.plot(range(1, length + 1), mean, color=colours(i), lw=2.2, label=label)
    title = f"{report.arch} on {report.data}\n{report.validation}"
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
