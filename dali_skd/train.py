"""The trainer: SGD over the DALI loader with mixed precision, per-epoch validation driving the lr plateau
schedule, checkpoints that resume exactly, and one process per GPU under torchrun.

RUN_DIR after a run: config.json, metrics.jsonl (a line per epoch), tb/ (TensorBoard), last.pt, best.pt,
curves.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dali_skd.checkpoint import load_checkpoint, load_classifier, save_checkpoint
from dali_skd.config import TrainConfig, changed_settings, format_changes, from_dict, save_json, to_dict
from dali_skd.data.loader import EvalLoader, TrainLoader
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import DistContext, init_distributed, shutdown
from dali_skd.evaluate import EvalResult, eval_split, evaluate, topk_hits
from dali_skd.files import write_atomic
from dali_skd.models import build_model
from dali_skd.plot import plot_curves
from dali_skd.pretrained import init_from_pretrained
from dali_skd.step import build_train_step

# settings that may change when a run is resumed, as they leave the result as it was: where the shards and the run
# are (moved to another disk), how the loader runs, logging and the number of epochs; any other change is refused
RESUMABLE_CHANGES = {
    "out",
    "epochs",
    "resume",
    "log_every",
    "loader.data",
    "loader.train_shards",
    "loader.eval_shards",
    "loader.threads",
    "loader.prefetch",
    "loader.device",
    "loader.hw_decoder_load",
    "loader.preallocate_width_hint",
    "loader.preallocate_height_hint",
    "loader.read_timeout",
    "loader.stall_timeout",
    "loader.max_bad_samples",
}


@dataclass
class TrainSummary:
    out: Path
    epochs: int
    best_top1: float
    best_epoch: int
    last: dict[str, Any]
    seconds: float
    skipped: int = 0  # samples skipped as damaged or unreadable, over both loaders and all ranks

    def format(self) -> str:
        skipped = ""
        if self.skipped:
            skipped = (
                f"\n{self.skipped} damaged or unreadable samples skipped (each named once above): "
                "`python cli.py preprocess verify DATA` lists them all"
            )
        return (
            f"best validation top-1 {self.best_top1:.2%} (video-level) at epoch {self.best_epoch} of {self.epochs}; "
            f"last epoch {self.last.get('samples_per_s', 0):.1f} samples/s, "
            f"data wait {self.last.get('data_wait', 0):.0%}\n"
            f"run directory {self.out}: best.pt, last.pt, metrics.jsonl, curves.png, "
            f"tb/ (tensorboard --logdir {self.out / 'tb'})" + skipped
        )


def train(cfg: TrainConfig) -> TrainSummary:
    ctx = init_distributed(cfg.loader.device)
    try:
        return Trainer(cfg, ctx).run()
    finally:
        shutdown(ctx)


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx, self.out = cfg, ctx, Path(cfg.out)
        manifest = load_manifest(cfg.loader.data, cfg.loader.read_timeout)
        self.classes = manifest.classes
        self.preprocessing = manifest.preprocessing()  # saved with the model, for `cli.py predict`
        resume = self._resume_state() if cfg.resume else None
        if resume is None and (self.out / "last.pt").exists():
            raise FileExistsError(f"{self.out} already holds a run: add --resume to continue it, or pass a new --out")

        torch.manual_seed(cfg.seed)
        teacher = None
        if cfg.teacher:
            teacher = load_classifier(cfg.teacher, ctx.device, manifest.num_classes)[0]
        model = build_model(cfg.arch, manifest.num_classes, shortcut=cfg.shortcut)
        if cfg.init and resume is None:  # a resume restores every weight from last.pt
            report = init_from_pretrained(model, cfg.init)
            if ctx.is_main:
                print(report.format())
                if note := report.input_norm_note(cfg.loader.input_norm):
                    print(note)
        model.freeze(cfg.freeze)
        step = build_train_step(cfg, model, manifest.num_classes, ctx.device, teacher, ctx.distributed)
        self.train_step = step
        self.method, self.optimizer, self.scaler = step.method, step.optimizer, step.scaler
        self.precision, self.channels_last = step.precision, step.channels_last
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience
        )
        self.start_epoch, self.best_top1, self.best_epoch = 0, -1.0, 0
        self.writer = None  # TensorBoard, rank 0 only
        if resume is not None:
            self._restore(resume)

        common = {
            "dtype": self.precision, "device": ctx.device, "rank": ctx.rank, "world": ctx.world,
            "channels_last": self.channels_last,
        }  # fmt: skip
        self.train_loader = TrainLoader(
            cfg.loader,
            "train",
            batch_size=cfg.batch_size,
            num_views=self.method.num_views,
            augment=cfg.augment if self.method.augment else None,
            seed=cfg.seed,
            **common,
        )
        self.val_loader = EvalLoader(
            cfg.loader,
            eval_split(list(manifest.splits), None),
            batch_size=cfg.batch_size,
            clips_per_video=cfg.val_clips,
            **common,
        )
        for loader in (self.train_loader, self.val_loader):  # skipped from the start, as the interrupted run did
            loader.mark_undecodable(resume.get("bad_samples", []) if resume else [], str(self.out / "last.pt"))

    def _resume_state(self) -> dict[str, Any] | None:
        path = self.out / "last.pt"
        if not path.exists():
            if self.ctx.is_main:
                print(f"--resume: {path} does not exist yet, starting from epoch 1")
            return None
        state = load_checkpoint(path)
        saved = from_dict(TrainConfig, state["config"], f"{path} config")
        changes = changed_settings(to_dict(saved), to_dict(self.cfg))
        refused = {name: values for name, values in changes.items() if name not in RESUMABLE_CHANGES}
        if refused:
            raise ValueError(
                f"{path} was trained with other settings ({format_changes(refused)}): resume with the run's "
                "settings (only where the data and the run are, how the loader runs, --log-every and --epochs may "
                "change), or pass a new --out"
            )
        if state["epoch"] > self.cfg.epochs:
            raise ValueError(
                f"{path} has trained {state['epoch']} epochs, more than --epochs {self.cfg.epochs}: resume with "
                f"--epochs {state['epoch']} or more, or pass a new --out"
            )
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best_top1, self.best_epoch = state["epoch"], state["best_top1"], state["best_epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        if self.ctx.device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def run(self) -> TrainSummary:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(cfg, self.out / "config.json")
            _truncate_metrics(self.out / "metrics.jsonl", self.start_epoch)
            from torch.utils.tensorboard import SummaryWriter  # slow to import; only rank 0 needs it

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.start_epoch + 1)
            print(
                f"training {cfg.method} / {cfg.arch} on {cfg.loader.data} ({len(self.classes)} classes) "
                f"with {ctx.world} process(es) on {ctx.device}, precision {self.precision}, "
                f"{self.train_loader.steps_per_epoch} steps per epoch"
            )
        started = time.perf_counter()
        record: dict[str, Any] = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._train_epoch(epoch)
            ctx.average_buffers(self.method)
            val = evaluate(self.method.model, self.val_loader, ctx, self.precision, self.channels_last)
            self.scheduler.step(val.video_top1)
            if val.video_top1 > self.best_top1:
                self.best_top1, self.best_epoch = val.video_top1, epoch + 1
            record.update(_val_fields(val), best_top1=self.best_top1)
            undecodable = sorted({s for part in ctx.gather(self._undecodable()) for s in part})
            if ctx.is_main:
                self._save(epoch, record, is_best=self.best_epoch == epoch + 1, bad_samples=undecodable)
        if self.writer is not None:
            self.writer.close()
        self.train_loader.close()  # their DALI pipelines and threads go now, not when the trainer is collected
        self.val_loader.close()
        skipped = int(ctx.sum([float(self.train_loader.stats.unusable + self.val_loader.stats.unusable)])[0])
        summary = TrainSummary(
            self.out, cfg.epochs, self.best_top1, self.best_epoch, record, time.perf_counter() - started, skipped
        )
        if ctx.is_main:
            print(summary.format())
        return summary

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx, loader = self.cfg, self.ctx, self.train_loader
        self.train_step.net.train()
        steps = loader.steps_per_epoch
        terms: dict[str, torch.Tensor] = {}
        hits = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        samples, waited = 0, 0.0
        skipped_before = loader.stats.skipped
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not ctx.is_main)
        started = before = time.perf_counter()
        for step, batch in enumerate(loader.epoch(epoch)):
            waited += time.perf_counter() - before
            output = self.train_step(batch.views, batch.labels)
            n = len(batch.labels)
            samples += n
            for name, value in {"loss": output.loss.detach(), **output.terms}.items():
                terms[name] = terms.get(name, 0.0) + value.double() * n
            hits += topk_hits(output.logits, batch.labels)
            if step % cfg.log_every == 0 or step == steps - 1:
                loss = output.loss.item()
                rate = samples * ctx.world / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.1f}")
                if self.writer is not None:
                    self.writer.add_scalar("step/loss", loss, epoch * steps + step)
            bar.update()
            before = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - started
        names = sorted(terms)
        totals = ctx.sum([float(terms[k]) for k in names] + [*hits.tolist(), samples])
        n_all = totals[-1]
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({("loss" if k == "loss" else f"loss_{k}"): totals[i] / n_all for i, k in enumerate(names)})
        record.update(
            train_top1=totals[len(names)] / n_all,
            train_top5=totals[len(names) + 1] / n_all,
            samples_per_s=n_all / ctx.max(seconds),
            data_wait=waited / seconds,
            epoch_seconds=seconds,
            skipped=int(ctx.sum([loader.stats.skipped - skipped_before])[0]),
        )
        return record

    def _undecodable(self) -> list[str]:
        """The videos this rank's loaders found DALI could not decode ("shard: key")."""
        return [*self.train_loader.undecodable, *self.val_loader.undecodable]

    def _save(self, epoch: int, record: dict[str, Any], is_best: bool, bad_samples: list[str]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(f"epoch/{key}", value, epoch + 1)
        self.writer.flush()
        state = {
            "method": self.method.state_dict(),  # the classifier is its "model." entries
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch + 1,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "config": to_dict(self.cfg),
            "classes": self.classes,
            "preprocessing": self.preprocessing,
            "metrics": record,
            "bad_samples": bad_samples,  # undecodable videos: a resumed run skips them from the start
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.ctx.device.type == "cuda" else [],
            },
        }
        save_checkpoint(self.out / "last.pt", state)
        if is_best:
            save_checkpoint(self.out / "best.pt", state)
        plot_curves(self.out)


def _val_fields(val: EvalResult) -> dict[str, float]:
    return {
        "val_top1": val.video_top1,
        "val_top5": val.video_top5,
        "val_clip_top1": val.clip_top1,
        "val_clip_top5": val.clip_top5,
        "val_videos": val.videos,
    }


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drops the lines of epochs after the checkpoint a run resumes from (written before a kill)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epochs_done]
    write_atomic(path, "".join(line + "\n" for line in kept))
