"""Evaluation: clip-level and video-level (the mean softmax over a video's clips and crops) top-1 and top-5
accuracy, per-class top-1, mean-class accuracy and the video-level confusion matrix, each video counted exactly
once over all ranks.

What the commands share: `evaluate` serves `eval`, the trainer's validation and `compare`; the scoring
(`clip_outputs`, `VideoMeans`) also serves `predict` (class probabilities of new videos) and `features` (the
encoder's pooled features): the same loader, the same clips, the same averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dali_skd.checkpoint import TrainedRun
from dali_skd.config import ClipConfig, LoaderConfig
from dali_skd.data.loader import EvalBatch, EvalLoader
from dali_skd.data.source import video_id
from dali_skd.distributed import DistContext
from dali_skd.progress import Progress
from dali_skd.runtime import autocast, resolve_precision


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their label among the top k scores, for each k (k capped at the class count), as a
    tensor on the logits' device: the training loop sums it without waiting for the GPU."""
    return topk_rows(logits, labels, ks).sum(dim=0)


def topk_rows(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Whether each row has its label among the top k scores, for each k: N x len(ks), bool."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1) for k in ks], dim=1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    return topk_hits(logits, labels, ks).tolist()


# -- scoring: clips in, one row per video out ----------------------------------------------------------------------


def clip_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: EvalLoader,
    device: torch.device,
    precision: str,
    channels_last: bool = False,
    progress: bool = False,
) -> Iterator[tuple[torch.Tensor, EvalBatch]]:
    """`forward`'s output (fp32) for every clip of the loader's videos, batch by batch, with the batch."""
    with Progress(loader.split, None, "clip", enabled=progress, leave=False) as bar:
        for batch in loader.epoch():
            x = batch.clips.to(memory_format=torch.channels_last_3d) if channels_last else batch.clips
            with torch.inference_mode(), autocast(precision, device):
                out = forward(x).float()
            bar.update(len(out))
            bar.show()
            yield out, batch


@dataclass
class VideoOutputs:
    """One row per video, sorted by video id (its split, then its index there): the mean of its clips' outputs."""

    ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    values: np.ndarray  # float32, videos x width

    @classmethod
    def concat(cls, parts: list[VideoOutputs]) -> VideoOutputs:
        """The rows of several ranks' parts, in video order."""
        ids = np.concatenate([p.ids for p in parts])
        order = np.argsort(ids, kind="stable")
        return cls(
            ids[order],
            np.concatenate([p.labels for p in parts])[order],
            np.concatenate([p.values for p in parts])[order],
        )


class VideoMeans:
    """The sum and count of each video's clip outputs (and clip-level hits), for the videos this rank reads."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}
        self._labels: dict[int, int] = {}
        self._hits: dict[int, np.ndarray] = {}  # its clips' top-1 and top-5 hits, when `add` is given them

    def add(self, batch: EvalBatch, outputs: torch.Tensor, hits: torch.Tensor | None = None) -> None:
        values = outputs.cpu().double().numpy()
        rows = hits.cpu().numpy().astype(np.int64) if hits is not None else [None] * len(values)
        for vid, label, row, hit in zip(batch.video_ids.tolist(), batch.labels.tolist(), values, rows, strict=True):
            if vid in self._sums:
                self._sums[vid] += row
                self._counts[vid] += 1
            else:
                self._sums[vid], self._counts[vid], self._labels[vid] = row.copy(), 1, label
            if hit is not None:
                self._hits[vid] = self._hits.get(vid, 0) + hit

    def drop(self, ids: Iterable[int]) -> None:
        """Forgets these videos: the decoder failed on one of their clips after others had been scored."""
        for vid in ids:
            for table in (self._sums, self._counts, self._labels, self._hits):
                table.pop(vid, None)

    def clip_totals(self) -> tuple[list[int], int]:
        """The clip-level hits (top-1, top-5) and the clips, over the videos kept."""
        return np.sum(list(self._hits.values()) or [[0, 0]], axis=0).tolist(), sum(self._counts.values())

    def local(self) -> VideoOutputs:
        """This rank's videos."""
        ids = sorted(self._sums)
        means = [self._sums[i] / self._counts[i] for i in ids]
        return VideoOutputs(
            np.array(ids, np.int64),
            np.array([self._labels[i] for i in ids], np.int64),
            np.array(means, np.float32).reshape(len(ids), self.width),
        )

    def gathered(self, ctx: DistContext) -> VideoOutputs:
        """Every rank's videos, on every rank."""
        return VideoOutputs.concat(ctx.gather(self.local()))


def video_means(
    forward: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    loader: EvalLoader,
    ctx: DistContext,
    precision: str,
    channels_last: bool = False,
    progress: bool = False,
) -> VideoOutputs:
    """`forward`'s output averaged over each video's clips and crops, for every video of every rank."""
    means = VideoMeans(width)
    for out, batch in clip_outputs(forward, loader, ctx.device, precision, channels_last, progress and ctx.is_main):
        means.add(batch, out)
    means.drop(loader.undecodable_ids())
    return means.gathered(ctx)


def video_sources(loader: EvalLoader, ctx: DistContext) -> dict[int, tuple[str, str]]:
    """Each video's key and source (its path in the original dataset) by video id, over all ranks, from the shard
    records: the epoch just run indexed local shards; streamed ones are read again."""
    local = {video_id(r.key, loader.layout.splits): (r.key, r.meta.source) for r in loader.reader.records()}
    return {vid: named for part in ctx.gather(local) for vid, named in part.items()}


def top_classes(probabilities: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes, best first (ties: the lower label first, as the confusion matrix counts)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": classes[i], "probability": round(float(probabilities[i]), 6)} for i in order]


# -- metrics ---------------------------------------------------------------------------------------------------------


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Videos counted by true class (row) and top-scoring class (column; ties: the lower label)."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, scores.argmax(axis=1)), 1)
    return matrix


@dataclass
class EvalResult:
    clip_top1: float
    clip_top5: float
    video_top1: float
    video_top5: float
    clips: int
    videos: int
    skipped: int
    classes: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)  # videos by true class (row) and predicted (column)
    scores: VideoOutputs | None = field(default=None, repr=False)  # every video's mean softmax, when asked for
    nonfinite_clips: int = 0  # clips whose scores held a NaN or an infinity: the figures mean nothing then

    @property
    def class_videos(self) -> list[int]:
        return [sum(row) for row in self.confusion]

    @property
    def per_class_top1(self) -> list[float | None]:
        """Video-level top-1 of each class; None for a class without videos."""
        return [row[c] / sum(row) if sum(row) else None for c, row in enumerate(self.confusion)]

    @property
    def mean_class_top1(self) -> float:
        """The mean of the per-class top-1 over the classes that have videos."""
        present = [a for a in self.per_class_top1 if a is not None]
        return sum(present) / len(present) if present else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "video_top1": self.video_top1,
            "video_top5": self.video_top5,
            "mean_class_top1": self.mean_class_top1,
            "clip_top1": self.clip_top1,
            "clip_top5": self.clip_top5,
            "videos": self.videos,
            "clips": self.clips,
            "skipped": self.skipped,
            "nonfinite_clips": self.nonfinite_clips,
            "per_class": [
                {"class": name, "videos": n, "top1": top1}
                for name, n, top1 in zip(self.classes, self.class_videos, self.per_class_top1, strict=True)
            ],
            "classes": self.classes,
            "confusion": self.confusion,
        }

    def format(self, worst: int = 5) -> str:
        lines = [
            f"video-level top-1 {self.video_top1:.2%}  top-5 {self.video_top5:.2%}  "
            f"mean-class top-1 {self.mean_class_top1:.2%}  ({self.videos} videos)",
            f"clip-level  top-1 {self.clip_top1:.2%}  top-5 {self.clip_top5:.2%}  ({self.clips} clips)",
        ]
        ranked = sorted(
            (top1, name, n)
            for name, n, top1 in zip(self.classes, self.class_videos, self.per_class_top1, strict=True)
            if top1 is not None
        )
        if len(ranked) > 1:
            lines.append(f"worst classes (video-level top-1 of {len(ranked)}):")
            lines += [f"  {top1:>7.2%}  {name} ({n} videos)" for top1, name, n in ranked[:worst]]
        if self.skipped:
            lines.append(
                f"skipped {self.skipped} damaged or unreadable videos (each named in the log): "
                "`python cli.py preprocess verify DATA` lists them all"
            )
        if self.nonfinite_clips:
            lines.append(
                f"{self.nonfinite_clips} clips scored NaN or infinity (the model's outputs overflow): these figures "
                "mean nothing; try --amp off"
            )
        return "\n".join(lines)


def evaluate(
    model: nn.Module,
    loader: EvalLoader,
    ctx: DistContext,
    precision: str,
    channels_last: bool = False,
    progress: bool = False,
    keep_scores: bool = False,
) -> EvalResult:
    """Scores every clip (and crop) of the loader's videos; a video's score is the mean softmax of its clips. The
    counts are summed over ranks; with `keep_scores` every video's score is gathered too (for a predictions file)."""
    model.eval()
    classes = loader.manifest.classes
    means = VideoMeans(len(classes))
    nonfinite = 0  # clips scored NaN or infinity
    skipped_before = loader.stats.skipped
    for logits, batch in clip_outputs(model, loader, ctx.device, precision, channels_last, progress and ctx.is_main):
        nonfinite += int((~logits.isfinite()).any(dim=1).sum())
        means.add(batch, logits.softmax(dim=1), topk_rows(logits, batch.labels))
    means.drop(loader.undecodable_ids())
    clip_hits, clips = means.clip_totals()
    videos = means.local()
    confusion = confusion_matrix(videos.values, videos.labels, len(classes))
    (top5,) = topk_correct(torch.from_numpy(videos.values), torch.from_numpy(videos.labels), (5,))
    total = ctx.sum_named(
        {
            "clip_hits": clip_hits,
            "clips": clips,
            "video_top5": top5,
            "unreadable": loader.stats.skipped - skipped_before,
            "nonfinite": nonfinite,
            "confusion": confusion.ravel(),
        }
    )
    confusion = np.rint(total["confusion"]).astype(np.int64).reshape(confusion.shape)
    n_videos, n_clips = int(confusion.sum()), int(total["clips"])
    return EvalResult(
        clip_top1=total["clip_hits"][0] / max(n_clips, 1),
        clip_top5=total["clip_hits"][1] / max(n_clips, 1),
        video_top1=int(np.trace(confusion)) / max(n_videos, 1),
        video_top5=total["video_top5"] / max(n_videos, 1),
        clips=n_clips,
        videos=n_videos,
        skipped=int(total["unreadable"]),
        classes=list(classes),
        confusion=confusion.tolist(),
        scores=VideoOutputs.concat(ctx.gather(videos)) if keep_scores else None,
        nonfinite_clips=int(total["nonfinite"]),
    )


def evaluate_checkpoint(
    path: str | Path,
    data: str,
    ctx: DistContext,
    *,
    amp: str,
    batch_size: int,
    clips_per_video: int,
    spatial_crops: int = 1,
    split: str | None = None,
    clip: ClipConfig | None = None,
    loader: LoaderConfig | None = None,
    shards: str | None = None,
    keep_scores: bool = False,
    progress: bool = False,
) -> tuple[EvalResult, EvalLoader]:
    """The figures of the checkpoint at `path` on `data`'s `split` (default: the held-out one), its clips cut as
    the run was trained (`clip`: otherwise), and the loader that read them (`eval` and `compare`)."""
    precision = resolve_precision(amp, ctx.device)
    run = TrainedRun.load(path, ctx.device)
    reader = run.eval_loader(
        data, split, clip=clip, loader=loader or LoaderConfig(), shards=shards, batch_size=batch_size,
        clips_per_video=clips_per_video, spatial_crops=spatial_crops, runtime=ctx.runtime(precision),
    )  # fmt: skip
    run.check_classes(reader.manifest.num_classes)
    result = evaluate(run.classifier, reader, ctx, precision, progress=progress, keep_scores=keep_scores)
    return result, reader
