"""`cli.py predict`: class probabilities for video files, through the code that made the training data and that
evaluates.

The files are transcoded by `preprocess` with the settings of the checkpoint's training data (`train` stores its
dataset's manifest settings in the checkpoint: `TrainedRun.preprocessing`), written as a one-split shard dataset in
a temporary folder and scored on the run's `EvalLoader` with the evaluator's clips, crops and averaging: a video
gets the probabilities `cli.py eval` would give it, and there is no second decode path.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dali_skd.checkpoint import TrainedRun
from dali_skd.config import PreprocessConfig, ScoreSettings
from dali_skd.distributed import DistContext
from dali_skd.errors import RunFailed
from dali_skd.evaluation import top_classes, video_means, video_sources
from dali_skd.files import check_writable
from dali_skd.runtime import resolve_device, resolve_precision
from dali_skd.settings import setting, settings
from preprocess.datasets import DatasetListing, Video
from preprocess.run import run_preprocess

SPLIT = "predict"  # the temporary dataset's one split


@settings
class PredictConfig(ScoreSettings):
    """`cli.py predict`: a checkpoint applied to video files."""

    top_k: int = setting(5, "classes listed per video, most probable first", at_least=1)
    json: str | None = setting(None, "also write the predictions to this JSON file")
    short_side: int | None = setting(
        None, "transcode to this short side (default: the checkpoint's, from its dataset's manifest)"
    )
    fps: float | None = setting(
        None, "transcode to this frame rate (default: the checkpoint's, from its dataset's manifest)", more_than=0
    )
    workers: int = setting(os.cpu_count() or 1, "videos transcoded at once", at_least=1)


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


def transcode_config(run: TrainedRun, cfg: PredictConfig, root: Path, out: Path) -> PreprocessConfig:
    """How new videos are made into samples for a run: as its training data was (the manifest settings `train`
    stored in its checkpoint), with --short-side and --fps replacing them."""
    given = {"short_side": cfg.short_side, "fps": cfg.fps}
    settings = {**run.preprocessing, **{k: v for k, v in given.items() if v is not None}}
    return PreprocessConfig(dataset="folder", out=str(out), root=str(root), workers=cfg.workers, **settings)


def run_predict(videos: list[str], cfg: PredictConfig) -> PredictResult:
    """The `cfg.top_k` most probable classes of each video, printed (a file that cannot be used: its reason, on
    stderr; then a RuntimeError saying how many)."""
    if cfg.json:
        check_writable(Path(cfg.json).parent, "--json")
    device = resolve_device(cfg.device)
    run = TrainedRun.load(cfg.checkpoint, device)
    paths = [Path(video).absolute() for video in videos]
    root = Path(os.path.commonpath([path.parent for path in paths]))
    sources = [path.relative_to(root).as_posix() for path in paths]
    with tempfile.TemporaryDirectory(prefix="dali-skd-predict-") as scratch:
        data = Path(scratch) / "data"
        listing = DatasetListing(["unlabelled"], {SPLIT: [Video(source, 0) for source in sources]})
        summary = run_preprocess(transcode_config(run, cfg, root, data), progress=False, listing=listing)
        failures = [json.loads(line) for line in summary.failed_list.read_text().splitlines()]
        reasons = {failure["source"]: failure["reason"] for failure in failures}
        probabilities = {}
        if summary.samples[SPLIT]:
            ctx = DistContext(rank=0, world=1, local_rank=0, device=device)
            precision = resolve_precision(cfg.amp, device)
            loader = run.eval_loader(
                str(data), SPLIT, clip=cfg.clip, loader=cfg.loader, batch_size=cfg.batch_size,
                clips_per_video=cfg.clips_per_video, spatial_crops=cfg.spatial_crops, runtime=ctx.runtime(precision),
            )  # fmt: skip
            model = run.classifier.eval()
            scores = video_means(lambda x: model(x).softmax(dim=1), len(run.classes), loader, ctx, precision)
            source_of = video_sources(loader, ctx)
            probabilities = {source_of[int(i)][1]: p for i, p in zip(scores.ids, scores.values, strict=True)}
            loader.close()
    predictions = [
        VideoPrediction(video, top_classes(probabilities[source], run.classes, cfg.top_k))
        if source in probabilities
        else VideoPrediction(video, [], reasons.get(source, "its frames could not be decoded"))
        for video, source in zip(videos, sources, strict=True)
    ]
    result = PredictResult(cfg.checkpoint, predictions)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    for line in result.errors():
        print(line, file=sys.stderr)
    if len(result.failed) < len(result.videos):
        print(result.format())
    if result.failed:
        raise RunFailed(f"{len(result.failed)} of {len(result.videos)} videos could not be predicted")
    return result
