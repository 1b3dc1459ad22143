"""`cli.py features`: the encoder's pooled features (`forward_features`, before `fc`) of every video of every split,
averaged over the video's clips and crops as `cli.py eval` averages its scores (the same loader and clips).

OUT/<split>.npy holds them (float16, videos x channels), OUT/<split>.jsonl a line per row in the same order: the
video's key, label and source (its path in the original dataset). The dataset need not be the checkpoint's own:
features of another dataset are what a linear probe or a retrieval index is fitted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_skd.checkpoint import TrainedRun
from dali_skd.config import ScoreSettings, data_field
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.evaluation import video_means, video_sources
from dali_skd.files import check_writable
from dali_skd.runtime import resolve_precision
from dali_skd.settings import setting, settings


@settings
class FeaturesConfig(ScoreSettings):
    """`cli.py features`: a checkpoint's encoder applied to every split of a dataset."""

    data: str = data_field()
    out: str = setting("features", "output directory: <split>.npy (float16, videos x channels) and <split>.jsonl")


@dataclass
class SplitFeatures:
    split: str
    videos: int
    channels: int
    array: Path  # <split>.npy
    rows: Path  # <split>.jsonl

    def format(self) -> str:
        return f"{self.split}: {self.videos} videos x {self.channels} features -> {self.array}, {self.rows}"


def run_features(cfg: FeaturesConfig) -> list[SplitFeatures]:
    ctx = init_distributed(cfg.device)
    try:
        if ctx.is_main:
            check_writable(cfg.out, "--out")
        manifest = load_manifest(cfg.data, cfg.loader.read_timeout)
        run = TrainedRun.load(cfg.checkpoint, ctx.device)
        precision = resolve_precision(cfg.amp, ctx.device)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        model = run.classifier.eval()
        written = []
        for split, info in manifest.splits.items():
            if not info.samples:
                continue
            loader = run.eval_loader(
                cfg.data, split, clip=cfg.clip, loader=cfg.loader, batch_size=cfg.batch_size,
                clips_per_video=cfg.clips_per_video, spatial_crops=cfg.spatial_crops, runtime=ctx.runtime(precision),
            )  # fmt: skip
            features = video_means(model.forward_features, model.num_features, loader, ctx, precision, progress=True)
            sources = video_sources(loader, ctx)
            loader.close()
            if not ctx.is_main:
                continue
            done = SplitFeatures(
                split, len(features.ids), model.num_features, out / f"{split}.npy", out / f"{split}.jsonl"
            )
            np.save(done.array, features.values.astype(np.float16))
            with open(done.rows, "w") as f:
                for vid, label in zip(features.ids.tolist(), features.labels.tolist(), strict=True):
                    key, source = sources[vid]
                    row = {"key": key, "label": label, "source": source}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(done.format())
            written.append(done)
        return written
    finally:
        shutdown(ctx)
