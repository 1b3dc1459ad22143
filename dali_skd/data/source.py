"""The Python side of the loader: shard samples in, batches of DALI pipeline inputs out.

For each video it draws the clips (start frames), checks the bytes it will decode, and lays out one column per
pipeline input. It runs in a background thread so the training loop never waits on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dali_skd.data.clips import StripPlan, clip_frames, plan_strips, random_start, spaced_starts, strip_slots
from dali_skd.data.shards import RankPart, SourceStats, VideoSample, iter_part_samples, jpeg_problem, webm_problem
from dali_skd.format import STRIPS_EXT, VIDEO_EXT, ShardFormat

Columns = list[list[np.ndarray]]  # one list of per-sample arrays per pipeline input


@dataclass(frozen=True)
class InputLayout:
    """The pipeline's external inputs, in order, for a shard format."""

    format: ShardFormat
    num_views: int
    clip_len: int
    frames_per_jpeg: int
    with_video_id: bool = False

    @property
    def slots(self) -> int:
        return strip_slots(self.clip_len, self.frames_per_jpeg) if self.format == "jpeg" else 0

    @property
    def names(self) -> list[str]:
        if self.format == "jpeg":
            per_view = [f"{what}{k}" for k in range(self.slots) for what in ("strip", "rows", "shape")] + ["order"]
            names = [f"v{v}_{n}" for v in range(self.num_views) for n in per_view]
        else:
            names = ["video", "frames"]
        return [*names, "label"] + (["video_id"] if self.with_video_id else [])

    def sample_columns(self, sample: VideoSample, starts: list[int], stats: SourceStats) -> list[np.ndarray]:
        """One array per input for a video and the start frame of each view; raises ValueError on bad bytes."""
        meta = sample.meta
        if meta.format != self.format:
            raise ValueError(f"format {meta.format}, the manifest says {self.format}")
        if self.format == "jpeg" and meta.frames_per_jpeg != self.frames_per_jpeg:
            raise ValueError(f"{meta.frames_per_jpeg} frames per JPEG, the manifest says {self.frames_per_jpeg}")
        clips = [clip_frames(meta.frames, self.clip_len, s) for s in starts]
        out: list[np.ndarray] = []
        if self.format == "jpeg":
            for frame_indices in clips:
                plan = plan_strips(frame_indices, self.frames_per_jpeg, self.slots)
                out += self._strip_columns(sample, plan)
                out.append(plan.order)
                stats.decoded_frames += sum(plan.rows)
        else:
            video = sample.read(VIDEO_EXT)
            problem = webm_problem(video)
            if problem:
                raise ValueError(problem)
            out += [np.frombuffer(video, np.uint8), np.array(clips, np.int32).ravel()]
            stats.decoded_frames += len(clips) * self.clip_len
        stats.clip_frames += len(clips) * self.clip_len
        out.append(np.array(meta.label, np.int64))
        if self.with_video_id:
            out.append(np.array(video_id(sample.key), np.int64))
        return out

    def _strip_columns(self, sample: VideoSample, plan: StripPlan) -> list[np.ndarray]:
        """Bytes, decoded rows and frame shape of each slot's strip; one read covers the clip's strips."""
        meta, offsets = sample.meta, sample.meta.strip_offsets
        first, last = min(plan.strips), max(plan.strips)
        data = sample.read(STRIPS_EXT, offsets[first], offsets[last + 1])
        for strip in range(first, last + 1):  # each strip checked once, though padding slots repeat one
            held = min(self.frames_per_jpeg, meta.frames - strip * self.frames_per_jpeg)
            jpeg = data[offsets[strip] - offsets[first] : offsets[strip + 1] - offsets[first]]
            problem = jpeg_problem(jpeg, meta.width, held * meta.height)
            if problem:
                raise ValueError(f"strip {strip}: {problem}")
        columns = []
        for strip, rows in zip(plan.strips, plan.rows, strict=True):
            jpeg = data[offsets[strip] - offsets[first] : offsets[strip + 1] - offsets[first]]
            columns += [
                np.frombuffer(jpeg, np.uint8),
                np.array([rows * meta.height], np.int32),
                np.array([rows, meta.height, meta.width, 3], np.int32),
            ]
        return columns


def video_id(key: str) -> int:
    """The video's index within its split, from its key (`test-0000123` -> 123)."""
    return int(key.rsplit("-", 1)[-1])


def train_batches(
    part: RankPart,
    layout: InputLayout,
    batch_size: int,
    rng: np.random.Generator,
    shuffle_buffer: int,
    same_clip: bool,
    stats: SourceStats,
) -> Iterator[Columns]:
    """Endless batches of training inputs: passes over the rank's shards, each in a fresh random order, samples
    mixed in a shuffle buffer, each view's clip trimmed at its own random start (or one clip for both views)."""
    buffer: list[list[np.ndarray]] = []
    batch: list[list[np.ndarray]] = []
    while True:
        usable = 0
        for sample in iter_part_samples(part, stats, rng.permutation(len(part.urls))):
            frames = sample.meta.frames
            starts = [random_start(frames, layout.clip_len, rng) for _ in range(1 if same_clip else layout.num_views)]
            try:
                columns = layout.sample_columns(sample, starts * layout.num_views if same_clip else starts, stats)
            except ValueError as e:
                stats.skip(sample.where, str(e))
                continue
            usable += 1
            buffer.append(columns)
            if len(buffer) < shuffle_buffer:
                continue
            batch.append(buffer.pop(int(rng.integers(len(buffer)))))
            if len(batch) == batch_size:
                yield _transpose(batch)
                batch = []
        if not usable:
            raise RuntimeError(f"no usable sample in {len(part.urls)} shard(s), first {part.urls[0]}")


def eval_batches(
    part: RankPart, layout: InputLayout, batch_size: int, clips_per_video: int, stats: SourceStats
) -> Iterator[Columns]:
    """Every video of the rank's part once, in order, as `clips_per_video` uniformly spaced clips; the last batch
    may be short."""
    batch: list[list[np.ndarray]] = []
    for sample in iter_part_samples(part, stats):
        try:
            rows = [
                layout.sample_columns(sample, [s], stats)
                for s in spaced_starts(sample.meta.frames, layout.clip_len, clips_per_video)
            ]
        except ValueError as e:
            stats.skip(sample.where, str(e))
            continue
        for columns in rows:
            batch.append(columns)
            if len(batch) == batch_size:
                yield _transpose(batch)
                batch = []
    if batch:
        yield _transpose(batch)


def _transpose(rows: list[list[np.ndarray]]) -> Columns:
    return [list(col) for col in zip(*rows, strict=True)]


class BackgroundBatches:
    """Runs a batch iterator in a thread, `depth` batches ahead; calling it returns the next batch (the shape
    DALI's batch-mode external source expects) and raises StopIteration at the end. Errors are re-raised here."""

    _END = object()

    def __init__(self, make: Callable[[], Iterator[Columns]], depth: int = 4) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="dali-skd-source")
        self._thread.start()

    def _run(self, make: Callable[[], Iterator[Columns]]) -> None:
        try:
            for batch in make():
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, which raises it with its traceback
            self._put(e)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __call__(self) -> Columns:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
