"""The trainer: SGD over the DALI loader with mixed precision, per-epoch validation driving the lr plateau
schedule, checkpoints that resume exactly, and one process per GPU under torchrun. `Trainer` runs the loop over its
parts; `Trainer.from_config` assembles them (the step: `step.py`; the checkpoint policy: `checkpoint.CheckpointSaver`).

RUN_DIR after a run: config.json, metrics.jsonl (a line per epoch), tb/ (TensorBoard), last.pt, best.pt,
curves.png, and .lock (held by the run that writes there: `files.lock_directory`); with `--track.to wandb|mlflow`,
tracker.json, the tracked run that gets the same (`tracking.py`).

A run survives what a cluster does to it:
- On SIGTERM, SIGINT or SIGUSR1 (`signals`) the current step finishes, last.pt is written with the step within the
  epoch and the epoch's running sums (`EpochSums`), and `Stopped` is raised: `--resume` goes on from that step with
  the batches, RNG and schedule of an uninterrupted run, to the same weights. Under torchrun the ranks agree to
  stop at the next check (`--log-every` steps: a collective every step would cost every step).
- A run resumes only with the settings it was trained with (but `checkpoint.RESUMABLE_CHANGES`) and on the stream
  of draws it was trained on (`source.data_stream`): never silently on another.
- A loss that is not finite, a checkpoint whose weights would not be, or `max_skipped_steps` fp16 steps in a row
  skipped by the grad scaler stop the run (`Diverged`); a validation with non-finite outputs is never the best.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dali_skd.checkpoint import CheckpointSaver, TrainedRun, nonfinite_tensors, resume_state
from dali_skd.config import TrainConfig, save_json
from dali_skd.data.holdout import protocol, training_holdout
from dali_skd.data.loader import EvalLoader, TrainLoader
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import DistContext, init_distributed, shutdown
from dali_skd.errors import RunFailed
from dali_skd.evaluation import EvalResult, evaluate, topk_hits
from dali_skd.files import DirectoryBusy, append_line, lock_directory, write_atomic
from dali_skd.memory import check_training_memory, training_memory
from dali_skd.methods import build_method
from dali_skd.models import build_model
from dali_skd.plot import parse_metrics, plot_curves
from dali_skd.pretrained import init_from_pretrained
from dali_skd.progress import Progress, duration
from dali_skd.runtime import resolve_precision
from dali_skd.signals import Stopped, stop_on_signals, stop_requested, work_saved
from dali_skd.step import TrainStep, build_train_step
from dali_skd.tracking import Tracker, check_tracking, track_training

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    out: Path
    epochs: int
    best_top1: float
    best_epoch: int
    last: dict[str, Any]
    seconds: float
    skipped: int = 0  # distinct training samples skipped as damaged or unreadable, over all ranks
    val_skipped: int = 0  # distinct validation videos
    validation: str = ""  # which videos the validation figures are of (`holdout.protocol`)

    def format(self) -> str:
        skipped = ""
        if self.skipped or self.val_skipped:
            counts = [
                f"{n} {what}{'s' * (n != 1)}"
                for n, what in ((self.skipped, "training sample"), (self.val_skipped, "validation video"))
                if n
            ]
            skipped = (
                f"\ndamaged or unreadable, skipped: {' and '.join(counts)} (each named once above): "
                "`python cli.py preprocess verify DATA` lists them all"
            )
        pace = (
            f"last epoch {self.last.get('samples_per_s', 0):.1f} samples/s, "
            f"data wait {self.last.get('data_wait', 0):.0%}"
            if self.last
            else "no epoch trained here: the run had trained them all before it was resumed"
        )
        return (
            f"best validation top-1 {self.best_top1:.2%} (video-level) at epoch {self.best_epoch} of {self.epochs} "
            f"({self.validation}); {pace}\n"
            f"run directory {self.out}: best.pt, last.pt, metrics.jsonl, curves.png, "
            f"tb/ (tensorboard --logdir {self.out / 'tb'})" + skipped
        )


LOST_WARNING = 0.05  # an epoch line warns when more than this share of the epoch's training samples was lost


class Diverged(RunFailed):
    """The loss or the weights stopped being finite."""


def train(cfg: TrainConfig) -> TrainSummary:
    check_tracking(cfg.track)  # a tracker not installed is said before anything starts
    with stop_on_signals():  # until the process group is gone too
        ctx = init_distributed(cfg.device)
        try:
            with main_rank_lock(ctx, Path(cfg.out)):
                return Trainer.from_config(cfg, ctx).run()
        finally:
            shutdown(ctx)


@contextmanager
def main_rank_lock(ctx: DistContext, directory: Path) -> Iterator[None]:
    """`lock_directory(directory)`, held by rank 0 for the block; if another process holds it, every rank raises
    `DirectoryBusy` before writing anything."""
    with ExitStack() as held:
        busy = None
        if ctx.is_main:
            try:
                held.enter_context(lock_directory(directory))
            except DirectoryBusy as e:
                busy = e
        if ctx.any(busy is not None):
            raise busy or DirectoryBusy(f"{directory} is in use by another run (rank 0 says which)")
        yield


def agreed_stop(ctx: DistContext) -> str | None:
    """The signal that asked this process or any other rank to stop (every rank must call it at the same point)."""
    asked = stop_requested()
    if ctx.any(asked is not None) and asked is None:
        return "a signal to another rank"
    return asked


@dataclass
class EpochSums:
    """What an epoch's metrics line is made of, summed over its steps so far. A mid-epoch checkpoint keeps them
    (summed over ranks), so that the epoch, resumed, ends with the line an uninterrupted one would."""

    terms: dict[str, torch.Tensor]  # each loss term x samples, float64 on the device
    hits: torch.Tensor  # top-1 and top-5 hits, float64 on the device
    samples: int = 0
    waited: float = 0.0  # seconds spent waiting for data
    seconds: float = 0.0  # of training, the part before a resume included
    scaler_skipped_steps: int = 0  # fp16 steps the grad scaler skipped (gradients not finite at its scale)

    @classmethod
    def start(cls, ctx: DistContext, saved: dict[str, Any] | None = None) -> EpochSums:
        """Zero, or what a mid-epoch checkpoint `saved` (on rank 0: the other ranks add theirs to it)."""
        sums = cls({}, torch.zeros(2, dtype=torch.float64, device=ctx.device))
        if saved is None:
            return sums
        sums.waited, sums.seconds, sums.scaler_skipped_steps = saved["waited"], saved["seconds"], saved["skipped"]
        if ctx.is_main:
            sums.terms = {k: torch.tensor(v, dtype=torch.float64, device=ctx.device) for k, v in saved["terms"].items()}
            sums.hits += torch.tensor(saved["hits"], dtype=torch.float64, device=ctx.device)
            sums.samples = saved["samples"]
        return sums

    def add(self, terms: dict[str, torch.Tensor], samples: int, hits: torch.Tensor) -> None:
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value.double() * samples
        self.hits += hits
        self.samples += samples

    def saved(self, ctx: DistContext) -> dict[str, Any]:
        """The sums over all ranks, for a checkpoint or the epoch's line (every rank must call it)."""
        names = sorted(self.terms)  # every rank's method logs the same terms
        terms = {f"term {k}": float(self.terms[k]) for k in names}
        total = ctx.sum_named({**terms, "hits": self.hits.tolist(), "samples": self.samples})
        return {
            "terms": {k: total[f"term {k}"] for k in names},
            "hits": total["hits"],
            "samples": int(total["samples"]),
            "waited": self.waited,
            "seconds": self.seconds,
            "skipped": self.scaler_skipped_steps,
        }


class Trainer:
    """A training run from its parts: the step (method, optimizer, scaler, precision), the lr schedule, the two
    loaders and the checkpoint saver, which holds where a resumed run starts. `from_config` assembles them."""

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        step: TrainStep,
        scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
        train_loader: TrainLoader,
        val_loader: EvalLoader,
        checkpoints: CheckpointSaver,
        validation: str | None = None,
    ) -> None:
        self.cfg, self.ctx, self.out = cfg, ctx, Path(cfg.out)
        self.validation = validation or protocol(cfg.val_fraction)  # which videos pick best.pt, in words
        self.train_step, self.scheduler, self.checkpoints = step, scheduler, checkpoints
        self.method, self.optimizer = step.method, step.optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.writer = None  # TensorBoard, rank 0 only
        self.tracker = Tracker()  # W&B or MLflow (`--track.to`): rank 0's, opened as the run starts
        self.optimizer_steps = self.skipped_in_a_row = 0  # a step the grad scaler skips does not step the optimizer
        self.optimizer.register_step_post_hook(self._count_optimizer_step)

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: DistContext) -> Trainer:
        """The run `cfg` says, on this process of `ctx`: resumed from its last.pt when `cfg.resume` asks for it."""
        manifest = load_manifest(cfg.data, cfg.loader.read_timeout)
        resume = resume_state(cfg, ctx)
        torch.manual_seed(cfg.seed)
        teacher = None
        if cfg.teacher:
            teacher = TrainedRun.load(cfg.teacher, ctx.device, manifest.num_classes).classifier
        model = build_model(cfg.arch, manifest.num_classes, shortcut=cfg.shortcut)
        if cfg.init and resume is None:  # a resume restores every weight from last.pt
            report = init_from_pretrained(model, cfg.init)
            if ctx.is_main:
                log.info(report.format())
                if note := report.input_norm_note(cfg.clip.norm):
                    log.warning(note)
        model.freeze(cfg.freeze)
        method = build_method(cfg.method, model, manifest.num_classes, cfg.objective, teacher)
        precision = resolve_precision(cfg.amp, ctx.device)
        step = build_train_step(method, cfg.optim, precision, ctx.device, cfg.channels_last, ctx.distributed)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            step.optimizer, mode="max", factor=cfg.optim.lr_factor, patience=cfg.optim.lr_patience
        )
        runtime = ctx.runtime(precision, step.channels_last)
        read = {"clip": cfg.clip, "loader": cfg.loader, "batch_size": cfg.batch_size, "runtime": runtime}
        holdout = None  # validation apart from test: a part of the training split, never trained on
        if cfg.val_fraction:
            holdout = training_holdout(cfg.data, manifest, cfg.val_fraction, cfg.train_shards, cfg.loader.read_timeout)
        train_loader = TrainLoader(
            cfg.data,
            "train",
            subset=holdout.training if holdout else None,
            sampling=cfg.sampling,
            shards=cfg.train_shards,
            num_views=method.num_views,
            augment=cfg.augment if method.augment else None,
            seed=cfg.seed,
            **read,
        )
        train_loader.check_epochs()
        if holdout is not None:
            val_loader = EvalLoader(
                cfg.data, "train", shards=cfg.train_shards, clips_per_video=cfg.val_clips, subset=holdout.validation,
                **read,
            )  # fmt: skip
        else:
            val_loader = EvalLoader(cfg.data, shards=cfg.eval_shards, clips_per_video=cfg.val_clips, **read)
        if ctx.device.type == "cpu":  # the model and the clips in the host's memory, which the kernel would defend
            held = sum(t.numel() * t.element_size() for t in method.state_dict().values())
            check_training_memory(cfg, training_memory(cfg, manifest.num_classes, held, train_loader, val_loader))
        # saved with the model: its classes, and how its videos were made (`cli.py predict` makes new ones so)
        checkpoints = CheckpointSaver(cfg, ctx, step, scheduler, manifest.classes, manifest.preprocessing())
        if resume is not None:
            checkpoints.restore(resume, train_loader.steps_per_epoch)
            for loader in (train_loader, val_loader):  # skipped from the start, as the interrupted run did
                loader.mark_undecodable(resume.get("bad_samples", []), str(checkpoints.last))
        validation = holdout.protocol() if holdout else None
        return cls(cfg, ctx, step, scheduler, train_loader, val_loader, checkpoints, validation)

    def run(self) -> TrainSummary:
        cfg, ctx, saver = self.cfg, self.ctx, self.checkpoints
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(cfg, self.out / "config.json")
            _truncate_metrics(self.out / "metrics.jsonl", saver.start_epoch)
            from torch.utils.tensorboard import SummaryWriter  # slow to import; only rank 0 needs it

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=saver.start_epoch + 1)
            self.tracker = track_training(cfg, self.out)
            log.info(
                f"training {cfg.method} / {cfg.arch} on {cfg.data} ({len(saver.classes)} classes) "
                f"with {ctx.world} process(es) on {ctx.device}, precision {self.train_step.precision}, "
                f"{self.train_loader.steps_per_epoch} steps per epoch; {self.validation}"
                + (
                    f"; resuming epoch {saver.start_epoch + 1} at step {saver.start_step + 1}"
                    if saver.start_step
                    else ""
                )
            )
        started = time.perf_counter()
        record: dict[str, Any] = {}
        try:
            for epoch in range(saver.start_epoch, cfg.epochs):
                first = saver.start_step if epoch == saver.start_epoch else 0
                record = self._train_epoch(epoch, first, saver.start_sums if first else None)
                ctx.average_buffers(self.method)
                validated = time.perf_counter()
                step = self.train_step
                val = evaluate(self.method.model, self.val_loader, ctx, step.precision, step.channels_last)
                record["val_seconds"] = time.perf_counter() - validated
                self.scheduler.step(val.video_top1)
                saver.validated(epoch, val.video_top1, finite=not val.nonfinite_clips)
                record.update(_val_fields(val), best_top1=saver.best_top1)
                self._check_weights(f"after epoch {epoch + 1}")
                bad_samples = self._bad_samples()
                if ctx.is_main:
                    self._save(epoch, record, bad_samples)
                    log.info(_epoch_line(record, cfg.epochs, saver.best_epoch))
                if epoch + 1 < cfg.epochs and (signal := agreed_stop(ctx)):
                    raise self._stopped(signal, f"after epoch {epoch + 1} of {cfg.epochs}")
        except BaseException as e:
            self.tracker.close("stopped" if isinstance(e, Stopped) else "failed")
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
            self.train_loader.close()  # their DALI pipelines and threads go now, not when the trainer is collected
            self.val_loader.close()
        unusable = ctx.sum_named({"train": self.train_loader.stats.unusable, "val": self.val_loader.stats.unusable})
        summary = TrainSummary(
            self.out, cfg.epochs, saver.best_top1, saver.best_epoch, record, time.perf_counter() - started,
            int(unusable["train"]), int(unusable["val"]), self.validation,
        )  # fmt: skip
        self.tracker.finish({"best_val_top1": saver.best_top1, "best_epoch": saver.best_epoch}, self.out / "curves.png")
        return summary

    def _train_epoch(self, epoch: int, first: int = 0, saved: dict[str, Any] | None = None) -> dict[str, Any]:
        """Epoch `epoch` from step `first` on (the sums of the steps before it `saved`); its metrics line. Raises
        `Stopped` once last.pt holds where a signal stopped it, `Diverged` if a loss is not finite."""
        cfg, ctx, loader = self.cfg, self.ctx, self.train_loader
        self.train_step.net.train()
        steps = loader.steps_per_epoch
        sums = EpochSums.start(ctx, saved)
        skipped_before = loader.stats.skipped
        bar = Progress(f"epoch {epoch + 1}/{cfg.epochs}", steps, "step", enabled=ctx.is_main, initial=first)
        recent: list[tuple[int, dict[str, torch.Tensor]]] = []  # the loss terms of the steps since the last check
        started = before = time.perf_counter()
        samples = waited = 0.0  # in this process, for the progress figures
        stop = None
        batches = loader.epoch(epoch, first)
        for step in itertools.count(first):
            batch = next(batches, None)
            if not ctx.every(batch is not None):  # a rank's pass ended early (samples were lost): every rank ends here
                break
            waited += time.perf_counter() - before
            optimizer_steps = self.optimizer_steps
            output = self.train_step(batch.views, batch.labels)
            self._count_skipped(self.optimizer_steps == optimizer_steps, sums, epoch, step)
            terms = {"loss": output.loss.detach(), **output.terms}
            sums.add(terms, len(batch.labels), topk_hits(output.logits, batch.labels))
            samples += len(batch.labels)
            recent.append((step, terms))
            bar.update()
            check = step % cfg.log_every == 0 or step == steps - 1
            if check or bar.due():
                loss = output.loss.item()
                elapsed = time.perf_counter() - started
                bar.show(
                    loss=f"{loss:.4g}",
                    samples=f"{samples * ctx.world / elapsed:.1f}/s",
                    data_wait=f"{waited / elapsed:.0%}",
                )
                if check and self.writer is not None:
                    self.writer.add_scalar("step/loss", loss, epoch * steps + step)
            if check:
                stop = self._check(recent, epoch, steps)
                recent.clear()
            elif not ctx.distributed:
                stop = stop_requested()  # alone, nothing to agree on: stop after this very step
            before = time.perf_counter()
            if stop:
                break
        batches.close()  # the loader is reset, after draining what it prefetched when the epoch ended early
        bar.close()
        sums.seconds += time.perf_counter() - started
        sums.waited += waited
        if recent:  # stopped between checks, or the epoch ended early: the losses since the last one are looked at
            self._check(recent, epoch, steps)
        if stop:
            self._check_weights(f"at epoch {epoch + 1}, step {step + 1}")
            # the loader was reset when the loop left; every rank takes part in the sums and the bad samples
            self.checkpoints.save_stopped(epoch, step + 1, sums.saved(ctx), steps, self._bad_samples())
            ctx.barrier()  # no rank ends before rank 0 has saved: torchrun would signal it as the first one ended
            raise self._stopped(stop, f"at epoch {epoch + 1}, step {step + 1} of {steps}")
        total = sums.saved(ctx)
        n_all = total["samples"]
        lost = int(ctx.sum_named({"skipped": loader.stats.skipped - skipped_before})["skipped"])
        if not n_all:
            raise RunFailed(
                f"epoch {epoch + 1} made no batch of {cfg.batch_size}: {lost} of its {loader.epoch_samples} training "
                f"samples were damaged or unreadable (named above): run `python cli.py preprocess verify {cfg.data}`"
            )
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({("loss" if k == "loss" else f"loss_{k}"): v / n_all for k, v in total["terms"].items()})
        record.update(
            train_top1=total["hits"][0] / n_all,
            train_top5=total["hits"][1] / n_all,
            samples_per_s=n_all / ctx.max(sums.seconds),
            data_wait=sums.waited / sums.seconds,
            epoch_seconds=sums.seconds,
            steps=step,  # fewer than steps_per_epoch where samples were lost
            skipped=lost,
            epoch_samples=loader.epoch_samples,
            scaler_skipped_steps=sums.scaler_skipped_steps,
        )
        return record

    def _count_optimizer_step(self, *_: Any) -> None:
        self.optimizer_steps += 1

    def _count_skipped(self, skipped: bool, sums: EpochSums, epoch: int, step: int) -> None:
        """Counts a step the grad scaler skipped; too many in a row are a divergence no scale avoids."""
        sums.scaler_skipped_steps += skipped
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row >= self.cfg.max_skipped_steps:
            raise Diverged(
                f"the fp16 gradients were not finite at any scale for {self.skipped_in_a_row} steps in a row, up to "
                f"epoch {epoch + 1}, step {step + 1}: training diverged ({self._last_good()}). Start again into a "
                f"new --out with a lower --optim.lr (this run: {self.cfg.optim.lr:g}) or --amp bf16"
            )

    def _check(self, recent: list[tuple[int, dict[str, torch.Tensor]]], epoch: int, steps: int) -> str | None:
        """Raises `Diverged`, naming the step and its loss terms, if a loss of the `recent` steps is not finite (one
        look at the device for all of them); else the signal to stop on, if any. Under torchrun one collective
        tells every rank both: if any rank's loss was not finite, every rank raises; if any rank got a signal,
        every rank stops."""
        finite = torch.stack([torch.stack([v.float() for v in t.values()]) for _, t in recent]).isfinite().all(1)
        bad = next((i for i, ok in enumerate(finite.tolist()) if not ok), None)
        signal = stop_requested()
        if self.ctx.distributed:
            anywhere = self.ctx.sum_named({"diverged": bad is not None, "signalled": signal is not None})
            if anywhere["diverged"] and bad is None:
                raise Diverged(f"another rank's loss was not finite by epoch {epoch + 1}, step {recent[-1][0] + 1}")
            if anywhere["signalled"] and signal is None:
                signal = "a signal to another rank"
        if bad is None:
            return signal
        step, terms = recent[bad]
        values = ", ".join(
            f"{name if name == 'loss' else 'loss_' + name} {float(value):.4g}" for name, value in terms.items()
        )
        raise Diverged(
            f"the loss is not finite at epoch {epoch + 1}, step {step + 1} of {steps} ({values}): training diverged "
            f"({self._last_good()}). Start again into a new --out with a lower --optim.lr "
            f"(this run: {self.cfg.optim.lr:g})"
        )

    def _check_weights(self, when: str) -> None:
        """A checkpoint never holds non-finite weights: `Diverged` instead (every rank checks its own copy)."""
        bad = nonfinite_tensors(self.method.trained_state())
        if bad:
            raise Diverged(
                f"the weights are not finite {when} ({len(bad)} tensors, e.g. {bad[0]}): training diverged "
                f"({self._last_good()}). Start again into a new --out with a lower --optim.lr "
                f"(this run: {self.cfg.optim.lr:g})"
            )

    def _last_good(self) -> str:
        last = self.checkpoints.last
        return f"{last}, from before, is the last checkpoint" if last.exists() else "no checkpoint was written"

    def _stopped(self, signal: str, where: str) -> Stopped:
        work_saved()
        return Stopped(
            f"stopped by {signal} {where}; {self.checkpoints.last} holds it",
            "continue with the same command and --resume (or --resume auto)",
        )

    def _bad_samples(self) -> list[str]:
        """The videos any rank's loaders found DALI could not decode ("shard: key"), on every rank (a collective)."""
        mine = [*self.train_loader.undecodable, *self.val_loader.undecodable]
        return sorted({sample for part in self.ctx.gather(mine) for sample in part})

    def _save(self, epoch: int, record: dict[str, Any], bad_samples: list[str]) -> None:
        """Epoch `epoch`'s metrics line, TensorBoard scalars, checkpoints, curves and tracked figures (rank 0)."""
        append_line(self.out / "metrics.jsonl", json.dumps(record))
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(f"epoch/{key}", value, epoch + 1)
        self.writer.flush()
        self.checkpoints.save_epoch(epoch, record, bad_samples)
        plot_curves(self.out)
        self.tracker.epoch(record)  # after last.pt: an epoch it holds is logged now, or on the resume


def _val_fields(val: EvalResult) -> dict[str, float]:
    return {
        "val_skipped": val.skipped,
        "val_top1": val.video_top1,
        "val_top5": val.video_top5,
        "val_clip_top1": val.clip_top1,
        "val_clip_top5": val.clip_top5,
        "val_videos": val.videos,
        "val_nonfinite_clips": val.nonfinite_clips,
    }


def _epoch_line(record: dict[str, Any], epochs: int, best_epoch: int) -> str:
    """The epoch in one line, printed with or without a terminal."""
    line = (
        f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, train top-1 {record['train_top1']:.1%}, "
        f"{record['samples_per_s']:.1f} samples/s, data wait {record['data_wait']:.0%}, "
        f"{duration(record['epoch_seconds'])}; validation top-1 {record['val_top1']:.2%} "
        f"top-5 {record['val_top5']:.2%} ({record['val_videos']} videos)"
    )
    line += (
        ", best so far" if best_epoch == record["epoch"] else f", best {record['best_top1']:.2%} (epoch {best_epoch})"
    )
    notes = {  # a count's noun, in the singular, and what follows it
        "skipped": ("damaged or unreadable training sample", "skipped"),
        "val_skipped": ("damaged or unreadable validation video", "skipped"),
        "scaler_skipped_steps": ("fp16 step", "skipped"),
        "val_nonfinite_clips": ("validation clip", "with non-finite scores"),
    }
    for key, (noun, rest) in notes.items():
        if n := record.get(key):
            line += f"; {n} {noun}{'s' * (n != 1)} {rest}"
        held = record.get("epoch_samples", 0)
        if key == "skipped" and held and n > LOST_WARNING * held:
            steps = record["steps"]
            line += (
                f" ({n / held:.0%} of the epoch's {held}, over the {LOST_WARNING:.0%} this warns at: the epoch trained "
                f"{steps} step{'s' * (steps != 1)} on what was left; `python cli.py preprocess verify DATA` lists them)"
            )
    return line


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drops the lines of epochs after the checkpoint a run resumes from (written before a kill), and a last line
    cut short (a kill or a full disk while it was written: its epoch is the one being redone)."""
    if not path.exists():
        return
    rows, torn = parse_metrics(path)
    if torn is not None:
        log.warning("%s: dropped its last line, cut short (%r); its epoch is trained again", path, torn[:60])
    kept = [row for row in rows if row["epoch"] <= epochs_done]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
