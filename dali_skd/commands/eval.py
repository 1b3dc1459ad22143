"""`cli.py eval`: a checkpoint's clip- and video-level top-1/top-5, per-class top-1 and confusion matrix on the
held-out split (`evaluation.evaluate_checkpoint`), printed; with `--json` also written, with the per-video
predictions (`<stem>.predictions.jsonl`) and the confusion matrix (`<stem>.confusion.png`) beside it. With
`--track.to wandb|mlflow` the figures (and files) go to the tracked run of the checkpoint's training, when its folder
records one there, else to a new run."""

from __future__ import annotations

import json
from pathlib import Path

from dali_skd.config import ScoreSettings, TrackConfig, data_field, to_dict
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.errors import RunFailed
from dali_skd.evaluation import EvalResult, evaluate_checkpoint, top_classes, video_sources
from dali_skd.files import check_writable
from dali_skd.plot import plot_confusion
from dali_skd.settings import setting, settings
from dali_skd.tracking import check_tracking, open_tracker, tracked_run_dir


@settings
class EvalConfig(ScoreSettings):
    """`cli.py eval`: a checkpoint on a split of a dataset."""

    data: str = data_field()
    split: str | None = setting(None, "split to evaluate (default: test, or val for Kinetics)")
    eval_shards: str | None = setting(None, "the split's shards instead of the manifest's: brace patterns or URLs")
    json: str | None = setting(
        None,
        "also write the results to this JSON file, the per-video predictions to <stem>.predictions.jsonl and the "
        "confusion matrix to <stem>.confusion.png beside it",
    )
    track: TrackConfig = setting(TrackConfig(), "experiment tracking")


def run_eval(cfg: EvalConfig) -> EvalResult:
    """A checkpoint on the held-out split (or `cfg.split`), printed by rank 0 (each video counted once over ranks)."""
    check_tracking(cfg.track)
    ctx = init_distributed(cfg.device)
    try:
        if cfg.json and ctx.is_main:  # before the scores, which would be lost
            check_writable(Path(cfg.json).parent, "--json")
        result, loader = evaluate_checkpoint(
            cfg.checkpoint, cfg.data, ctx, amp=cfg.amp, batch_size=cfg.batch_size, clips_per_video=cfg.clips_per_video,
            spatial_crops=cfg.spatial_crops, split=cfg.split, clip=cfg.clip, loader=cfg.loader,
            shards=cfg.eval_shards, keep_scores=cfg.json is not None, progress=True,
        )  # fmt: skip
        if not result.videos:
            why = f"{result.skipped} skipped as unreadable, named above" if result.skipped else "its shards hold none"
            raise RunFailed(
                f"{cfg.checkpoint} on {loader.split}: no video could be scored ({why}): check the shards, or --data"
            )
        sources = video_sources(loader, ctx) if cfg.json else {}
        loader.close()
        if ctx.is_main:
            print(
                f"{cfg.checkpoint} on {loader.split} ({loader.clips_per_video} clips x {loader.spatial_crops} "
                "crops per video):"
            )
            print(result.format())
            written = write_eval_files(Path(cfg.json), result, cfg, loader.split, sources) if cfg.json else []
            if written:
                print("wrote " + ", ".join(map(str, written)))
            track_eval(cfg, loader.split, result, written)
        return result
    finally:
        shutdown(ctx)


def track_eval(cfg: EvalConfig, split: str, result: EvalResult, written: list[Path]) -> None:
    """The figures (`eval/<split>/<name>`) and files to the tracker `--track.to` names, if any."""
    figures = {k: v for k, v in result.to_json().items() if type(v) in (int, float)}
    folder = Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).parent  # of the run
    settings = {"eval": to_dict(cfg)}  # apart from the training settings of the run it may join
    with open_tracker(
        cfg.track, tracked_run_dir(folder, cfg.track), f"{folder.name}-eval", settings, "eval"
    ) as tracked:
        tracked.summary({f"eval/{split}/{k}": v for k, v in figures.items()})
        tracked.files(*written)


def write_eval_files(
    path: Path, result: EvalResult, cfg: EvalConfig, split: str, sources: dict[int, tuple[str, str]]
) -> list[Path]:
    """`path` (the figures), `<stem>.predictions.jsonl` (a line per video: key, source, label, top-5 classes with
    their probabilities) and `<stem>.confusion.png`."""
    predictions, png = path.with_suffix(".predictions.jsonl"), path.with_suffix(".confusion.png")
    scores = result.scores
    assert scores is not None, "evaluate(keep_scores=True) keeps the scores the predictions file needs"
    with open(predictions, "w") as f:
        for vid, label, probabilities in zip(scores.ids, scores.labels, scores.values, strict=True):
            key, source = sources[int(vid)]
            row = {
                "key": key,
                "source": source,
                "label": int(label),
                "label_name": result.classes[label],
                "top": top_classes(probabilities, result.classes, 5),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    title = f"{Path(cfg.checkpoint).name} on {split}: video-level top-1 {result.video_top1:.1%}"
    plot_confusion(result.confusion, result.classes, png, title)
    figures = {
        "checkpoint": cfg.checkpoint,
        "split": split,
        "clips_per_video": cfg.clips_per_video,
        "spatial_crops": cfg.spatial_crops,
        **result.to_json(),
        "predictions": str(predictions),
        "confusion_png": str(png),
    }
    path.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return [path, predictions, png]
