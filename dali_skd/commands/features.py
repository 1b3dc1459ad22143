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

from dali_skd.checkpoint import load_classifier
from dali_skd.config import FeaturesConfig, TrainConfig, from_dict
from dali_skd.data.loader import EvalLoader
from dali_skd.data.shards import load_manifest
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.evaluation import video_means, video_sources
from dali_skd.runtime import resolve_precision


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
    ctx = init_distributed(cfg.clips.device)
    try:
        manifest = load_manifest(cfg.data)
        model, state = load_classifier(cfg.checkpoint, ctx.device)
        trained = from_dict(TrainConfig, state["config"], f"{cfg.checkpoint} config")
        loader_cfg = cfg.clips.loader_config(trained.loader, cfg.data)
        precision = resolve_precision(cfg.clips.amp, ctx.device)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        model.eval()
        written = []
        for split, info in manifest.splits.items():
            if not info.samples:
                continue
            loader = EvalLoader(
                loader_cfg,
                split,
                batch_size=cfg.clips.batch_size,
                spatial_crops=cfg.clips.spatial_crops,
                dtype=precision,
                device=ctx.device,
                rank=ctx.rank,
                world=ctx.world,
            )
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
