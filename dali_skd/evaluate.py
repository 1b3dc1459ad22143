"""Evaluation: clip-level and video-level (clip scores averaged per video) top-1 and top-5 accuracy, each video
counted exactly once over all ranks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dali_skd.checkpoint import load_classifier
from dali_skd.config import EvalConfig
from dali_skd.data.loader import EvalLoader
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import DistContext, init_distributed, shutdown
from dali_skd.runtime import autocast, resolve_precision


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their label among the top k scores, for each k (k capped at the class count), as a
    tensor on the logits' device: the training loop sums it without waiting for the GPU."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    return topk_hits(logits, labels, ks).tolist()


@dataclass
class EvalResult:
    clip_top1: float
    clip_top5: float
    video_top1: float
    video_top5: float
    clips: int
    videos: int
    skipped: int

    def format(self) -> str:
        return (
            f"video-level top-1 {self.video_top1:.2%}  top-5 {self.video_top5:.2%}  ({self.videos} videos)\n"
            f"clip-level  top-1 {self.clip_top1:.2%}  top-5 {self.clip_top5:.2%}  ({self.clips} clips)"
            + (f"\nskipped {self.skipped} unreadable videos" if self.skipped else "")
        )


def evaluate(
    model: nn.Module,
    loader: EvalLoader,
    ctx: DistContext,
    precision: str,
    channels_last: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Scores every clip of the loader's videos; a video's score is the mean softmax of its clips."""
    model.eval()
    video_sum: dict[int, torch.Tensor] = {}
    video_label: dict[int, int] = {}
    clip_hits = [0, 0]
    clips = 0
    skipped_before = loader.stats.skipped
    bar = tqdm(desc="eval", unit="clip", disable=not (progress and ctx.is_main), leave=False)
    with torch.inference_mode(), autocast(precision, ctx.device):
        for batch in loader.epoch():
            x = batch.clips.to(memory_format=torch.channels_last_3d) if channels_last else batch.clips
            logits = model(x).float()
            clip_hits = [a + b for a, b in zip(clip_hits, topk_correct(logits, batch.labels), strict=True)]
            clips += len(logits)
            probs = logits.softmax(dim=1).cpu()
            for vid, p, y in zip(batch.video_ids.tolist(), probs, batch.labels.tolist(), strict=True):
                video_sum[vid] = video_sum[vid] + p if vid in video_sum else p.clone()
                video_label[vid] = y
            bar.update(len(logits))
    bar.close()
    video_hits = [0, 0]
    if video_sum:
        ids = sorted(video_sum)
        scores = torch.stack([video_sum[i] for i in ids])
        video_hits = topk_correct(scores, torch.tensor([video_label[i] for i in ids]))
    c1, c5, n_clips, v1, v5, n_videos, skipped = ctx.sum(
        [*clip_hits, clips, *video_hits, len(video_sum), loader.stats.skipped - skipped_before]
    )
    return EvalResult(
        clip_top1=c1 / max(n_clips, 1),
        clip_top5=c5 / max(n_clips, 1),
        video_top1=v1 / max(n_videos, 1),
        video_top5=v5 / max(n_videos, 1),
        clips=int(n_clips),
        videos=int(n_videos),
        skipped=int(skipped),
    )


def eval_split(manifest_splits: list[str], split: str | None) -> str:
    """The split to evaluate on: as asked, else the held-out one (`test`, or `val` for Kinetics)."""
    if split:
        return split
    held_out = [s for s in manifest_splits if s != "train"]
    if not held_out:
        raise ValueError("the dataset has no held-out split (test or val) to evaluate on: pass --split")
    return held_out[0]


def run_eval(cfg: EvalConfig) -> EvalResult:
    """`cli.py eval`: a checkpoint on the held-out split, printed and optionally written as JSON."""
    ctx = init_distributed(cfg.loader.device)
    try:
        manifest = load_manifest(cfg.loader.data)
        model, _ = load_classifier(cfg.checkpoint, ctx.device, manifest.num_classes)
        precision = resolve_precision(cfg.amp, ctx.device)
        loader = EvalLoader(
            cfg.loader,
            eval_split(list(manifest.splits), cfg.split),
            batch_size=cfg.batch_size,
            clips_per_video=cfg.loader.clips_per_video,
            dtype=precision,
            device=ctx.device,
            rank=ctx.rank,
            world=ctx.world,
        )
        result = evaluate(model, loader, ctx, precision, progress=True)
        if ctx.is_main:
            print(f"{cfg.checkpoint} on {loader.split} ({cfg.loader.clips_per_video} clips per video):")
            print(result.format())
            if cfg.json:
                Path(cfg.json).write_text(json.dumps({"checkpoint": cfg.checkpoint, **asdict(result)}, indent=2))
        return result
    finally:
        shutdown(ctx)
