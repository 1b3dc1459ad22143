"""`cli.py demo`: the whole system on the built-in synthetic dataset, on whatever device there is.

Generates the videos, preprocesses them into shards, trains SKD-SRL with a tiny 3D ResNet, evaluates it with
several clips per video and prints the accuracy against chance. `--compare` also trains the plain
cross-entropy baseline on the same data. Re-running it continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dali_skd.config import EvalConfig, LoaderConfig, PreprocessConfig, TrainConfig
from dali_skd.evaluate import run_eval
from dali_skd.runtime import resolve_device
from dali_skd.train import train


@dataclass(frozen=True)
class DemoPreset:
    """Sized so the default finishes in under 10 minutes on 2 CPU cores: about 6 (docs/benchmarks.md)."""

    classes: int = 8
    videos_per_class: int = 60
    arch: str = "r3d10-tiny"
    epochs: int = 16
    batch_size: int = 16
    lr: float = 0.01
    lr_patience: int = 3
    eval_clips: int = 5


def run_demo(
    out: str = "runs/demo",
    compare: bool = False,
    json_path: str | None = None,
    device: str = "auto",
    preset: DemoPreset = DemoPreset(),
) -> dict:
    from preprocess.run import run_preprocess  # the heaviest import of the demo, needed only here

    out_dir, started = Path(out), time.perf_counter()
    data = out_dir / "data"
    if not (data / "manifest.json").exists():
        run_preprocess(
            PreprocessConfig(
                dataset="synthetic",
                out=str(data),
                root=str(out_dir / "videos"),
                classes=preset.classes,
                videos_per_class=preset.videos_per_class,
                workers=os.cpu_count() or 1,
                resume=data.exists(),
            )
        )
    rows = []
    for method in ["skd-srl"] + (["baseline"] if compare else []):
        method_started = time.perf_counter()
        loader = LoaderConfig(data=str(data), device=device, clips_per_video=preset.eval_clips)
        summary = train(
            TrainConfig(
                method=method,
                arch=preset.arch,
                out=str(out_dir / method),
                epochs=preset.epochs,
                batch_size=preset.batch_size,
                lr=preset.lr,
                lr_patience=preset.lr_patience,
                loader=loader,
                resume=True,
            )
        )
        result = run_eval(EvalConfig(checkpoint=str(out_dir / method / "best.pt"), batch_size=32, loader=loader))
        rows.append(
            {
                "method": method,
                "test_top1": result.video_top1,
                "test_top5": result.video_top5,
                "clip_top1": result.clip_top1,
                "best_val_epoch": summary.best_epoch,
                "seconds": time.perf_counter() - method_started,
            }
        )
    chance = 1 / preset.classes
    report = {
        "device": str(resolve_device(device)),
        "method": rows[0]["method"],
        "test_top1": rows[0]["test_top1"],
        "chance": chance,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    print(format_demo(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_demo(report: dict) -> str:
    lines = [
        f"\nSynthetic motion dataset, {report['rows'][0]['method']} on {report['device']}; "
        f"chance {report['chance']:.1%}",
        f"{'method':<14}{'test top-1':>12}{'top-5':>9}{'clip top-1':>12}{'minutes':>9}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['method']:<14}{r['test_top1']:>12.1%}{r['test_top5']:>9.1%}{r['clip_top1']:>12.1%}"
            f"{r['seconds'] / 60:>9.1f}"
        )
    lines.append(f"total {report['seconds'] / 60:.1f} minutes")
    return "\n".join(lines)
