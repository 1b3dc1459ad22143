"""The `preprocess` command: list a dataset, transcode its videos on `--workers` threads, write shards in a fixed
order, and finish with the manifest, failed.jsonl and a summary.

Every split's videos are sorted by path, then shuffled with `--seed`: shards hold a mix of classes, and a video's
key is its place in that order, the same in a single run and in `--part` runs. Videos are transcoded N at a time
(each in its own ffmpeg process, JPEG encoding in a thread that releases the GIL) but handed to the shard writer
in order, which is what makes a resumed run, or N parts merged, end with the same samples as one run.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy
import PIL

import dali_skd
from dali_skd.config import PreprocessConfig
from dali_skd.files import lock_directory
from dali_skd.format import (
    FAILED_NAME,
    MANIFEST_NAME,
    SHORT_VIDEO_FRAMES,
    SampleMeta,
    ShardManifest,
    SplitInfo,
    sample_key,
    sample_members,
    strip_checksums,
)
from dali_skd.progress import Progress
from dali_skd.signals import Stopped, stop_on_signals, stop_requested
from preprocess.datasets import DatasetListing, PreprocessError, Video, dataset_root, list_dataset
from preprocess.shards import (
    JOURNAL_DIR,
    Part,
    SplitWriter,
    check_settings,
    known_sum,
    run_file,
    shard_pattern,
    write_results,
)
from preprocess.transcode import DEFAULT_QUALITY, EncodedVideo, TranscodeSettings, VideoError, ffmpeg_version, transcode

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class PreprocessSummary:
    dataset: str
    manifest: Path  # manifest.json, or manifest.part-I-of-N.json for a part
    samples: dict[str, int]  # per split
    shards: dict[str, int]
    frames: int
    videos: int  # videos of this run (of this part): done now, done before a resume, and failed
    done_before: int  # by the interrupted run a --resume continued
    failures: int
    short_videos: int
    seconds: float
    failed_list: Path
    cost: DiskCost

    @property
    def videos_per_second(self) -> float:
        return (self.videos - self.done_before) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        splits = ", ".join(
            f"{name} {self.samples[name]} samples in {self.shards[name]} shards" for name in self.samples
        )
        lines = [
            f"preprocess {self.dataset}: {splits}, {self.frames} frames -> {self.manifest}",
            f"  {self.videos - self.done_before} videos in {self.seconds:.1f} s ({self.videos_per_second:.2f} videos/s)"
            + (f", {self.done_before} done before the resume" if self.done_before else ""),
            f"  {self.short_videos} shorter than {SHORT_VIDEO_FRAMES} frames (kept; the loader loops them)",
            f"  {self.failures} failed" + (f", listed in {self.failed_list}" if self.failures else ""),
        ]
        lines += self.cost.lines()
        if self.manifest.name != MANIFEST_NAME:
            lines.append(f"  once every part has finished: python cli.py preprocess merge {self.manifest.parent}")
        return "\n".join(lines)

    __str__ = format


@dataclass
class DiskCost:
    """What the shards of a run take on disk, per video and per second of video, against the source files; and, when
    `--part` or `--limit` took only some of the dataset's videos, what all of them would take at the same rate."""

    splits: dict[str, SplitInfo]
    taken: dict[str, int]  # videos of each split this run was given (failures included)
    listed: dict[str, int]  # videos of each whole split

    def lines(self) -> list[str]:
        stored = sum(info.samples for info in self.splits.values())
        shard_bytes = sum(shard.bytes for info in self.splits.values() for shard in info.shards)
        if not stored:
            return []
        seconds = known_sum(info.seconds for info in self.splits.values())
        source = known_sum(info.source_bytes for info in self.splits.values())
        line = f"  disk: {_size(shard_bytes)} of shards, {_size(shard_bytes / stored)} a video"
        if seconds:
            line += f", {_size(shard_bytes / seconds)} a video-second ({seconds / stored:.1f} s a video)"
        if source:
            line += f"; {shard_bytes / source:.2f}x the {_size(source)} of their source files"
        lines = [line]
        if self.taken != self.listed:
            whole = {
                name: sum(s.bytes for s in info.shards) / max(1, self.taken[name]) * self.listed[name]
                for name, info in self.splits.items()
            }
            lines.append(
                f"  the whole dataset at this rate (this run took {sum(self.taken.values()):,} of its "
                f"{sum(self.listed.values()):,} videos): {_size(sum(whole.values()))} ("
                + ", ".join(f"{name} {self.listed[name]:,} videos {_size(whole[name])}" for name in whole)
                + ")"
            )
        return lines


def _size(n: float) -> str:
    """Bytes in decimal units: 1,005 kB, 24.5 MB, 1.2 TB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n / 1e3:,.1f} kB" if n < 10e3 else f"{n / 1e3:,.0f} kB"


@dataclass(frozen=True)
class _Task:
    split: str
    index: int  # place in the split's shuffled order
    video: Video


def run_preprocess(
    cfg: PreprocessConfig, progress: bool = True, listing: DatasetListing | None = None
) -> PreprocessSummary:
    """Preprocess `cfg.dataset` into `cfg.out` (see the module docstring), showing a progress bar; return the
    summary for the CLI to print. Raises PreprocessError for input or flags it cannot work with. `listing` gives
    the videos (under `cfg.root`) instead of the dataset adapter: `cli.py predict` transcodes its files this way."""
    part = Part.parse(cfg.part)
    with stop_on_signals(), lock_directory(cfg.out, lock_name(part)):  # one run at a time (--part: one per part)
        return _preprocess(cfg, progress, listing)


def lock_name(part: Part | None) -> str:
    """The lock file of a run in OUT: `.lock`, or `.lock.part-2-of-4` (the parts of an array job share OUT)."""
    return f".lock{part.suffix if part else ''}"


def _preprocess(cfg: PreprocessConfig, progress: bool, listing: DatasetListing | None) -> PreprocessSummary:
    started = time.perf_counter()
    part = Part.parse(cfg.part)
    settings = transcode_settings(cfg)
    out = Path(cfg.out)
    root = dataset_root(cfg)
    if not cfg.resume:
        _check_fresh_out(out, part, root)
    listing = listing if listing is not None else list_dataset(cfg, root)
    orders = {split: shuffled(videos, split, cfg.seed) for split, videos in listing.splits.items()}
    ranges = {split: _range(len(order), part, cfg.limit) for split, order in orders.items()}
    check_settings(out, part, _run_settings(cfg, settings, listing, orders))

    writers = {split: SplitWriter(out, split, part, *ranges[split], _shard_bytes(cfg)) for split in orders}
    tasks = [
        _Task(split, index, orders[split][index])
        for split, writer in writers.items()
        for index in range(writer.next_video, writer.end)
    ]
    videos = sum(end - start for start, end in ranges.values())
    done_before = videos - len(tasks)
    with Progress(f"preprocess {cfg.dataset}", videos, "video", enabled=progress, initial=done_before) as bar:
        failed = sum(len(writer.journal.failures()) for writer in writers.values())  # by an interrupted run
        for task, result in ordered_map(lambda t: (t, _transcode_task(t, root, settings)), tasks, cfg.workers):
            if signal := stop_requested():  # before recording it: the signal may have killed its ffmpeg too
                raise Stopped(
                    f"preprocess stopped by {signal} after {bar.done} of {videos} videos; {out} keeps the shards it "
                    "finished",
                    "continue with the same command and --resume",
                )
            writer = writers[task.split]
            if isinstance(result, str):
                writer.add_failure(task.index, {"source": task.video.source, "split": task.split, "reason": result})
                failed += 1
            else:
                meta = _sample_meta(task.video, result, listing, settings)
                members = sample_members(sample_key(task.split, task.index), meta, result.media)
                writer.add_sample(task.index, members, result.frames, result.seconds, result.source_bytes)
            if task.index + 1 == writer.end:
                writer.finish()
            bar.update()
            bar.show(failed=failed)

    failures = [failure for writer in writers.values() for failure in writer.journal.failures()]
    manifest = ShardManifest(
        dataset=cfg.dataset,
        split_number=listing.split_number,
        classes=listing.classes,
        format=settings.format,
        frames_per_jpeg=settings.frames_per_jpeg if settings.format == "jpeg" else 0,
        short_side=settings.short_side,
        fps=settings.fps,
        quality=settings.quality,
        optimize_huffman=settings.optimize_huffman and settings.format == "jpeg",
        splits={split: writer.journal.split_info() for split, writer in writers.items()},
        failures=len(failures),
        tools=tool_versions(settings.ffmpeg),
    )
    manifest_path = write_results(out, part, manifest, failures)
    return PreprocessSummary(
        dataset=cfg.dataset,
        manifest=manifest_path,
        samples={split: info.samples for split, info in manifest.splits.items()},
        shards={split: len(info.shards) for split, info in manifest.splits.items()},
        frames=sum(info.frames for info in manifest.splits.values()),
        videos=videos,
        done_before=done_before,
        failures=manifest.failures,
        short_videos=sum(info.short_videos for info in manifest.splits.values()),
        seconds=time.perf_counter() - started,
        failed_list=out / run_file(FAILED_NAME, part),
        cost=DiskCost(
            manifest.splits,
            taken={split: end - start for split, (start, end) in ranges.items()},
            listed={split: len(order) for split, order in orders.items()},
        ),
    )


def _range(videos: int, part: Part | None, limit: int | None) -> tuple[int, int]:
    """The videos [start, end) of a split's order that a run takes: its part's, at most `limit` of them."""
    start, end = part.range(videos) if part else (0, videos)
    return start, end if limit is None else min(end, start + limit)


def transcode_settings(cfg: PreprocessConfig) -> TranscodeSettings:
    """The transcoding settings, their defaults resolved (quality, the ffmpeg binary); the config's limits are checked
    where it is read, and here the quality's, which depend on the format."""
    quality = cfg.quality if cfg.quality is not None else DEFAULT_QUALITY[cfg.format]
    low, high = {"jpeg": (1, 100), "vp9": (0, 63)}[cfg.format]
    if not low <= quality <= high:
        raise PreprocessError(f"--quality {quality}: {cfg.format} takes {low} to {high}")
    return TranscodeSettings(
        find_ffmpeg(cfg.ffmpeg), cfg.format, cfg.short_side, cfg.fps, quality, cfg.frames_per_jpeg, cfg.optimize_huffman
    )


def find_ffmpeg(explicit: str | None) -> str:
    """--ffmpeg, else `ffmpeg` on PATH, else the binary imageio-ffmpeg ships."""
    if explicit is not None:
        found = shutil.which(explicit)
        if found is None:
            raise PreprocessError(f"--ffmpeg {explicit}: not an executable; give the path of an ffmpeg binary")
        return found
    if found := shutil.which("ffmpeg"):
        return found
    import imageio_ffmpeg  # only when needed: verify and the GPU machine have no ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def tool_versions(ffmpeg_binary: str) -> dict[str, str]:
    return {
        "ffmpeg": ffmpeg_version(ffmpeg_binary),
        "python": sys.version.split()[0],
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "dali-skd": dali_skd.__version__,
    }


def shuffled(videos: list[Video], split: str, seed: int) -> list[Video]:
    """The split's fixed order: its videos (sorted by path) shuffled by `seed`, so shards mix the classes."""
    order = list(videos)
    random.Random(f"{split}:{seed}").shuffle(order)
    return order


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on `workers` threads: results in the order of `items`, at most 2 x workers in flight."""
    pool = ThreadPoolExecutor(workers)
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _transcode_task(task: _Task, root: Path, settings: TranscodeSettings) -> EncodedVideo | str:
    """The transcoded video, or the reason it failed."""
    try:
        return transcode(root / task.video.source, settings)
    except VideoError as e:
        return str(e)


def _sample_meta(
    video: Video, encoded: EncodedVideo, listing: DatasetListing, settings: TranscodeSettings
) -> SampleMeta:
    return SampleMeta(
        label=video.label,
        label_name=listing.classes[video.label],
        source=video.source,
        frames=encoded.frames,
        fps=encoded.fps,
        width=encoded.width,
        height=encoded.height,
        format=encoded.format,
        frames_per_jpeg=settings.frames_per_jpeg if encoded.format == "jpeg" else 0,
        strip_offsets=encoded.strip_offsets,
        strip_crc32=strip_checksums(encoded.media, encoded.strip_offsets),
        media_crc32=zlib.crc32(encoded.media) if encoded.format == "vp9" else None,
    )


def _shard_bytes(cfg: PreprocessConfig) -> int:
    return int(cfg.shard_size_mb * 1_000_000)


def _run_settings(
    cfg: PreprocessConfig, settings: TranscodeSettings, listing: DatasetListing, orders: dict[str, list[Video]]
) -> dict[str, object]:
    """What must not change between a run and its --resume: the flags that shape the samples, and the videos."""
    return {
        "dataset": cfg.dataset,
        "split": listing.split_number,
        "format": settings.format,
        "short_side": settings.short_side,
        "fps": settings.fps,
        "quality": settings.quality,
        "frames_per_jpeg": settings.frames_per_jpeg,
        "optimize_huffman": settings.optimize_huffman,
        "shard_size_mb": cfg.shard_size_mb,
        "seed": cfg.seed,
        "part": cfg.part,
        "limit": cfg.limit,
        "classes": listing.classes,
        "videos": {
            split: hashlib.sha256("\n".join(f"{v.source}\t{v.label}" for v in order).encode()).hexdigest()[:16]
            for split, order in orders.items()
        },
    }


def _check_fresh_out(out: Path, part: Part | None, root: Path) -> None:
    """Without --resume, refuse an OUT that already holds this run's files (for a part, its own files: the parts
    of an array job share OUT). The synthetic videos generated into OUT/videos do not count."""
    if not out.is_dir():
        return
    generated = {root.resolve(), root.resolve().with_name(f"{root.name}.lock")}
    if part is None:
        taken = [
            p.name for p in sorted(out.iterdir()) if p.resolve() not in generated and not p.name.startswith(".lock")
        ]
    else:
        own_files = [run_file(name, part) for name in (MANIFEST_NAME, FAILED_NAME)]
        taken = [name for name in own_files if (out / name).exists()]
        taken += [p.name for p in sorted((out / JOURNAL_DIR).glob(f"*{part.suffix}.*"))]
        pattern = shard_pattern(part)
        taken += [p.name for p in sorted(out.glob("*/*")) if pattern.fullmatch(p.name)]
    if taken:
        raise PreprocessError(
            f"{out} already holds {', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''}: add --resume to continue "
            "that run, or choose a new --out"
        )
