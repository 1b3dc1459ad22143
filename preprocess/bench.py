"""The preprocessing benchmark: videos per second of `preprocess` on the synthetic set, against a plain ffmpeg
command line doing the same decode, frame rate, scale and encode on the same files (one process per file, as
many at once as `workers`), and the bytes per stored frame of each shard format.

Each side is timed in wall-clock seconds and in CPU seconds (this process and its ffmpeg children): on a machine
other jobs share, the wall-clock ratio swings with their load, the CPU ratio much less."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg

from dali_skd.config import PreprocessConfig
from dali_skd.errors import RunFailed
from dali_skd.format import SHARD_FORMATS, ShardFormat, ShardManifest
from preprocess.run import run_preprocess, transcode_settings
from preprocess.transcode import VP9_CPU_USED, VP9_KEYFRAME_INTERVAL, TranscodeSettings


@dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # user + system seconds of this process and its children


@dataclass
class PreprocessBenchRow:
    format: ShardFormat
    videos: int
    frames: int
    preprocess: Timing  # end to end: listing, transcoding, shards, manifest
    plain_ffmpeg: Timing
    shard_bytes: int

    @property
    def videos_per_second(self) -> float:
        return self.videos / self.preprocess.wall

    @property
    def plain_videos_per_second(self) -> float:
        return self.videos / self.plain_ffmpeg.wall

    @property
    def ratio(self) -> float:
        """Wall-clock throughput of preprocess over plain ffmpeg's (target: at least 0.9)."""
        return self.plain_ffmpeg.wall / self.preprocess.wall

    @property
    def cpu_ratio(self) -> float:
        """The same for CPU time: plain ffmpeg's CPU seconds over preprocess's."""
        return self.plain_ffmpeg.cpu / self.preprocess.cpu

    @property
    def bytes_per_frame(self) -> float:
        return self.shard_bytes / self.frames


def bench_preprocess(
    work_dir: Path,
    workers: int = os.cpu_count() or 1,
    classes: int = 4,
    videos_per_class: int = 10,
    seed: int = 0,
    formats: tuple[ShardFormat, ...] = SHARD_FORMATS,
    repeats: int = 3,
) -> list[PreprocessBenchRow]:
    """Generate (once) the synthetic set in `work_dir/videos`, then for each format preprocess it and run the plain
    ffmpeg equivalent, alternately `repeats` times, keeping the fastest of each; print a table, return its rows."""
    from preprocess.synthetic import generate_synthetic  # numpy rendering, needed only here

    work_dir = Path(work_dir)
    root = generate_synthetic(work_dir / "videos", classes, videos_per_class, seed, workers)
    sources = sorted(root.glob("*/*/*.mp4"))
    rows = []
    for format in formats:
        out = work_dir / format
        cfg = PreprocessConfig(
            dataset="synthetic",
            root=str(root),
            out=str(out),
            format=format,
            workers=workers,
            classes=classes,
            videos_per_class=videos_per_class,
            seed=seed,
        )
        settings = transcode_settings(cfg)
        ours, plain = [], []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            ours.append(timed(run_preprocess, cfg, progress=False))
            plain.append(timed(plain_ffmpeg, sources, settings, workers, work_dir / f"{format}-ffmpeg"))
        manifest = ShardManifest.load(out)
        rows.append(
            PreprocessBenchRow(
                format=format,
                videos=len(sources),
                frames=sum(split.frames for split in manifest.splits.values()),
                preprocess=_fastest(ours),
                plain_ffmpeg=_fastest(plain),
                shard_bytes=sum(shard.bytes for split in manifest.splits.values() for shard in split.shards),
            )
        )
    print(format_table(rows, workers, f"{len(sources)} synthetic videos ({classes} classes), best of {repeats}"))
    return rows


def plain_ffmpeg(sources: list[Path], settings: TranscodeSettings, workers: int, out: Path) -> None:
    """One ffmpeg process per file, `workers` at once, decoding, resampling, scaling and encoding: JPEG files
    (`-q:v 2`) or a webm with the VP9 settings `preprocess` uses."""
    shutil.rmtree(out, ignore_errors=True)
    commands = []
    for i, source in enumerate(sources):
        video = ffmpeg.input(str(source)).filter("fps", fps=settings.fps or "source_fps")
        video = video.filter("scale", -2, settings.short_side)
        if settings.format == "jpeg":
            (out / f"{i:05d}").mkdir(parents=True)
            output = video.output(str(out / f"{i:05d}" / "%05d.jpg"), **{"q:v": 2})
        else:
            out.mkdir(parents=True, exist_ok=True)
            output = video.output(
                str(out / f"{i:05d}.webm"),
                vcodec="libvpx-vp9",
                crf=settings.quality,
                g=VP9_KEYFRAME_INTERVAL,
                **{"b:v": 0, "row-mt": 1, "cpu-used": VP9_CPU_USED},
            )
        commands.append(output.global_args("-nostdin", "-loglevel", "error").compile(cmd=settings.ffmpeg))
    with ThreadPoolExecutor(workers) as pool:
        for result in pool.map(lambda command: subprocess.run(command, capture_output=True, check=False), commands):
            if result.returncode != 0:
                raise RunFailed(f"plain ffmpeg failed: {result.stderr.decode(errors='replace')[-500:]}")


def timed(work: Callable[..., object], *args: Any, **kwargs: Any) -> Timing:
    cpu, wall = _cpu_seconds(), time.perf_counter()
    work(*args, **kwargs)
    return Timing(time.perf_counter() - wall, _cpu_seconds() - cpu)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _fastest(timings: list[Timing]) -> Timing:
    return Timing(min(t.wall for t in timings), min(t.cpu for t in timings))


def format_table(rows: list[PreprocessBenchRow], workers: int, what: str) -> str:
    lines = [
        f"preprocess benchmark: {what}, {workers} workers, {os.cpu_count()} CPU cores",
        f"{'format':<8}{'videos/s':>10}{'plain ffmpeg videos/s':>23}{'ratio':>8}"
        f"{'CPU ms/video':>14}{'plain ffmpeg':>14}{'CPU ratio':>11}{'bytes/frame':>13}",
    ]
    for row in rows:
        lines.append(
            f"{row.format:<8}{row.videos_per_second:>10.2f}{row.plain_videos_per_second:>23.2f}{row.ratio:>8.2f}"
            f"{1000 * row.preprocess.cpu / row.videos:>14.0f}{1000 * row.plain_ffmpeg.cpu / row.videos:>14.0f}"
            f"{row.cpu_ratio:>11.2f}{row.bytes_per_frame:>13,.0f}"
        )
    return "\n".join(lines)
