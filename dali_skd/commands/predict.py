"""`cli.py predict`: class probabilities for video files, through the code that made the training data and that
evaluates.

The files are transcoded by `preprocess` with the settings of the checkpoint's training data (`train` stores its
dataset's manifest settings in the checkpoint), written as a one-split shard dataset in a temporary folder and
scored on an `EvalLoader` with the evaluator's clips, crops and averaging: a video gets the probabilities
`cli.py eval` would give it, and there is no second decode path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dali_skd.checkpoint import load_classifier
from dali_skd.config import PredictConfig, PreprocessConfig, TrainConfig, from_dict
from dali_skd.data.loader import EvalLoader
from dali_skd.distributed import DistContext
from dali_skd.evaluation import top_classes, video_means, video_sources
from dali_skd.runtime import resolve_device, resolve_precision

SPLIT = "predict"  # the temporary dataset's one split


@dataclass
class VideoPrediction:
    video: str  # the path as given
    top: list[dict[str, Any]]  # the most probable classes with their probabilities, best first
    error: str | None = None  # why the file could not be used (then `top` is empty)


@dataclass
class PredictResult:
    checkpoint: str
    videos: list[VideoPrediction]

    @property
    def failed(self) -> list[VideoPrediction]:
        return [v for v in self.videos if v.error is not None]

    def format(self) -> str:
        return "\n".join(
            f"{v.video}: " + ", ".join(f"{c['class']} {c['probability']:.1%}" for c in v.top)
            for v in self.videos
            if v.error is None
        )

    def errors(self) -> list[str]:
        """A line per file that could not be used: its path, the reason, what to do."""
        return [
            f"{v.video}: {v.error}; not predicted (check the path, and that `ffmpeg -i` reads it)" for v in self.failed
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "videos": [
                {"video": v.video, "error": v.error} if v.error else {"video": v.video, "top": v.top}
                for v in self.videos
            ],
        }


def transcode_config(state: dict[str, Any], cfg: PredictConfig, root: Path, out: Path) -> PreprocessConfig:
    """How new videos are made into samples for a checkpoint: as its training data was (the manifest settings
    `train` stored in it), with --short-side and --fps replacing them."""
    stored = state.get("preprocessing")
    if stored is None and cfg.short_side is None:
        raise ValueError(
            f"{cfg.checkpoint} does not record how its training videos were preprocessed (it was saved by an older "
            "dali-skd): pass --short-side, and --fps if they were resampled, as in its dataset's manifest.json"
        )
    given = {"short_side": cfg.short_side, "fps": cfg.fps}
    settings = {**(stored or {}), **{k: v for k, v in given.items() if v is not None}}
    return PreprocessConfig(dataset="folder", out=str(out), root=str(root), workers=cfg.workers, **settings)


def run_predict(videos: list[str], cfg: PredictConfig) -> PredictResult:
    """The `cfg.top_k` most probable classes of each video; a file that cannot be used gets its reason instead."""
    from preprocess.datasets import DatasetListing, Video  # preprocess's imports are heavy; only predict needs them
    from preprocess.run import run_preprocess

    device = resolve_device(cfg.clips.device)
    model, state = load_classifier(cfg.checkpoint, device)
    trained = from_dict(TrainConfig, state["config"], f"{cfg.checkpoint} config")
    classes = state["classes"]
    paths = [Path(video).absolute() for video in videos]
    root = Path(os.path.commonpath([path.parent for path in paths]))
    sources = [path.relative_to(root).as_posix() for path in paths]
    with tempfile.TemporaryDirectory(prefix="dali-skd-predict-") as scratch:
        data = Path(scratch) / "data"
        listing = DatasetListing(["unlabelled"], {SPLIT: [Video(source, 0) for source in sources]})
        summary = run_preprocess(transcode_config(state, cfg, root, data), progress=False, listing=listing)
        failures = [json.loads(line) for line in summary.failed_list.read_text().splitlines()]
        reasons = {failure["source"]: failure["reason"] for failure in failures}
        probabilities = {}
        if summary.samples[SPLIT]:
            ctx = DistContext(rank=0, world=1, local_rank=0, device=device)
            precision = resolve_precision(cfg.clips.amp, device)
            loader = EvalLoader(
                cfg.clips.loader_config(trained.loader, str(data)),
                SPLIT,
                batch_size=cfg.clips.batch_size,
                spatial_crops=cfg.clips.spatial_crops,
                dtype=precision,
                device=device,
            )
            model.eval()
            scores = video_means(lambda x: model(x).softmax(dim=1), len(classes), loader, ctx, precision)
            source_of = video_sources(loader, ctx)
            probabilities = {source_of[int(i)][1]: p for i, p in zip(scores.ids, scores.values, strict=True)}
            loader.close()
    predictions = [
        VideoPrediction(video, top_classes(probabilities[source], classes, cfg.top_k))
        if source in probabilities
        else VideoPrediction(video, [], reasons.get(source, "its frames could not be decoded"))
        for video, source in zip(videos, sources, strict=True)
    ]
    result = PredictResult(cfg.checkpoint, predictions)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    return result
