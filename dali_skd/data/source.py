"""The host side of the loader: shard samples in, batches of named pipeline inputs out.

Per batch, in a few numpy calls: the clips' start frames, the JPEG strips (and rows of them) each clip needs, and
every random draw of the augmentations. Per sample, only what cannot be vectorised: a view of its strips' bytes,
and a check of each strip (its checksum, its header) the first time it is used. A batch is a dict keyed by the
pipeline's input names: uniform columns are stacked into one array, and a view's strips travel as one buffer that
the pipeline cuts apart; beside them, `RECORDS` names each row's video, for the loader (DALI never sees it). All
randomness is drawn here from one numpy generator per epoch, so an epoch is a pure function of
(seed, epoch, rank), whatever the pipeline ran before.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from dali_skd.config import AugmentConfig
from dali_skd.data.augment import AUGMENTATIONS, CROP, chosen, draw_layout, ranged
from dali_skd.data.checks import VIDEOS_PER_SPLIT, strip_problem, video_problem
from dali_skd.data.clips import clip_frames, plan_strips, random_starts, spaced_starts, strip_slots
from dali_skd.data.shards import PartReader, SourceStats, VideoRecord
from dali_skd.errors import RunFailed
from dali_skd.format import ShardFormat

Batch = dict[str, Any]  # input name -> a stacked array (uniform columns) or a list of 1-D uint8 arrays (bytes)
RECORDS = "records"  # the batch column that is no pipeline input: each row's VideoRecord, to name a failed row


def draw_columns(augmented: bool) -> dict[str, tuple[str, ...]]:
    """The names of the columns of each draws input of a view, from the augmentation table: `value` (the crop
    window's place in [0, 1], then each ranged parameter), `coin` (apply each augmentation to this clip?) and
    `choice` (each chosen parameter); only the crop window's place without the augmentations."""
    if not augmented:
        return {"value": CROP}
    return {
        "value": (*CROP, *(a.name for a in ranged())),
        "coin": tuple(AUGMENTATIONS),
        "choice": tuple(a.name for a in chosen()),
    }


DATA_STREAM_REVISION = 2  # raise it when the host side draws in another order (`train_batches`), not by the table
# (2: an epoch is one pass over the shards, its shuffle buffer emptied at the end)


def data_stream() -> str:
    """The version of the stream of random draws a training run's epochs are made of: this code's order of draws and
    the augmentation table's layout of them (`augment.draw_layout`). A checkpoint records it; a run is resumed only
    on the stream it was trained on."""
    digest = hashlib.sha1(",".join(draw_layout()).encode()).hexdigest()[:8]
    return f"{DATA_STREAM_REVISION}-{digest}"


# (x - mean) / std of 0-255 pixels: the paper's [-1, 1], or what Hara et al.'s Kinetics models were trained on
# (3D-ResNets-PyTorch): the 2020 release, mean 0.4345 0.4051 0.3775 and std 0.2768 0.2713 0.2737 of [0, 1] values
# (mean.py, `--mean_dataset kinetics`); the 2018 release, 0-255 values less the ActivityNet mean, not divided
# (its defaults: `--norm_value 1 --mean_dataset activitynet`, no `--std_norm`)
INPUT_NORMS = {
    "paper": ([127.5] * 3, [127.5] * 3),
    "kinetics": ([255 * m for m in (0.4345, 0.4051, 0.3775)], [255 * s for s in (0.2768, 0.2713, 0.2737)]),
    "kinetics-2018": ([114.7748, 107.7354, 99.4750], [1.0] * 3),
}


@dataclass(frozen=True)
class Input:
    """One external input of the pipeline: a stacked column of `dtype` with `shape` per sample, or (shape None)
    one 1-D uint8 array per sample."""

    name: str
    dtype: type
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class InputLayout:
    """The pipeline's inputs and outputs by name, for a shard format and a clip layout."""

    format: ShardFormat
    num_views: int
    clip_len: int
    frames_per_jpeg: int
    augmented: bool = False  # with the augmentations' draws (else only the crop window's place)
    with_video_id: bool = False
    frame_stride: int = 1  # a clip takes every frame_stride-th frame
    splits: tuple[str, ...] = ()  # the manifest's splits, in order: with the key's index, a video's id

    @property
    def slots(self) -> int:
        return strip_slots(self.clip_len, self.frames_per_jpeg, self.frame_stride) if self.format == "jpeg" else 0

    @cached_property
    def inputs(self) -> dict[str, Input]:
        """Every column holds all views of a sample, view v at index v: few arrays per batch."""
        views, out = self.num_views, []
        if self.format == "jpeg":
            out += [
                Input("strips", np.uint8, None),  # the video's strips laid end to end, read where they lie
                # per view and slot: the strip's byte start and length in `strips`, and its decoded frames' FHWC shape
                Input("slots", np.int32, (views, self.slots, 6)),
                Input("order", np.int32, (views, self.clip_len)),  # each clip's frames among its decoded ones
            ]
        else:
            out += [Input("video", np.uint8, None), Input("frames", np.int32, (views * self.clip_len,))]
        dtypes = {"value": np.float32, "coin": np.bool_, "choice": np.int32}
        out += [Input(name, dtypes[name], (views, len(cols))) for name, cols in draw_columns(self.augmented).items()]
        out.append(Input("label", np.int64, ()))
        if self.with_video_id:
            out.append(Input("video_id", np.int64, ()))
        return {i.name: i for i in out}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The pipeline's outputs, in order: one clip tensor per view, the labels (and the video ids)."""
        return (*(f"view{v}" for v in range(self.num_views)), "label", *(("video_id",) if self.with_video_id else ()))

    @property
    def media_ext(self) -> str:
        return "jpgs" if self.format == "jpeg" else "webm"

    def arrange(self, batch: Batch) -> tuple[Any, ...]:
        """The batch's columns in the pipeline's input order, after checking each one's name, type and shape: a
        column fed under the wrong name is an error, never a silently wrong input. `RECORDS` is left out."""
        names = batch.keys() - {RECORDS}
        if names != self.inputs.keys():
            missing, extra = self.inputs.keys() - names, names - self.inputs.keys()
            raise ValueError(f"pipeline inputs: missing {sorted(missing)}, unknown {sorted(extra)}")
        size = len(batch["label"])
        for name, spec in self.inputs.items():
            column = batch[name]
            if spec.shape is None:
                ok = isinstance(column, list) and all(c.dtype == spec.dtype and c.ndim == 1 for c in column[:1])
                found = f"{type(column).__name__} of {len(column)}"
            else:
                ok = (
                    isinstance(column, np.ndarray)
                    and column.dtype == spec.dtype
                    and column.shape[1:] == spec.shape
                    and column.flags.c_contiguous  # DALI reads it in place
                )
                found = f"{getattr(column, 'dtype', type(column).__name__)} {getattr(column, 'shape', '')}"
            if not ok or len(column) != size:
                wanted = "a list of 1-D uint8 arrays" if spec.shape is None else f"{np.dtype(spec.dtype)} {spec.shape}"
                raise ValueError(f"pipeline input {name!r}: expected {wanted} for {size} samples, got {found}")
        return tuple(batch[name] for name in self.inputs)


def video_id(key: str, splits: Sequence[str]) -> int:
    """A video's id, from its key `<split>-<index>`: the same index in two splits is two videos (`test-0000123` ->
    1 * 2^32 + 123 when test is the manifest's second split), and ids sort by split, then index."""
    split, _, index = key.rpartition("-")
    return splits.index(split) * VIDEOS_PER_SPLIT + int(index)


# -- clips: the record-dependent columns -----------------------------------------------------------------------


def clip_columns(
    layout: InputLayout, records: Sequence[VideoRecord], starts: np.ndarray, stats: SourceStats
) -> tuple[Batch, np.ndarray]:
    """The inputs that depend on the videos, for clip row r of `records[r]` with view v starting at frame
    `starts[r, v]`; and which rows are usable (False where a strip or webm is broken: its record then holds
    the reason)."""
    frames = np.fromiter((r.meta.frames for r in records), np.int64, len(records))
    indices = clip_frames(frames, starts, layout.clip_len, layout.frame_stride)  # (R, V, T)
    batch = _strip_columns(layout, records, indices) if layout.format == "jpeg" else _video_columns(records, indices)
    ok = np.fromiter((r.problem is None for r in records), bool, len(records))
    if layout.format == "jpeg":
        stats.decoded_frames += int(batch["slots"][ok, :, :, 2].sum())  # frames decoded per slot
    else:
        stats.decoded_frames += int(ok.sum()) * indices.shape[1] * layout.clip_len
    batch["label"] = np.fromiter((r.meta.label for r in records), np.int64, len(records))
    batch[RECORDS] = list(records)
    if layout.with_video_id:
        batch["video_id"] = np.fromiter((video_id(r.key, layout.splits) for r in records), np.int64, len(records))
    stats.clip_frames += int(ok.sum()) * indices.shape[1] * layout.clip_len
    return batch, ok


def _strip_columns(layout: InputLayout, records: Sequence[VideoRecord], indices: np.ndarray) -> Batch:
    n, views, slots, fpj = len(records), layout.num_views, layout.slots, layout.frames_per_jpeg
    plan = plan_strips(indices.reshape(n * views, -1), fpj, slots)  # every view of every clip: row r * views + v
    offsets = np.zeros((n, max(len(r.offsets) for r in records)), np.int64)  # each record's, padded
    for i, record in enumerate(records):
        offsets[i, : len(record.offsets)] = record.offsets
    offsets = np.repeat(offsets, views, axis=0)
    begin = np.take_along_axis(offsets, plan.strips, axis=1)
    end = np.take_along_axis(offsets, plan.strips + 1, axis=1)
    height = np.repeat(np.fromiter((r.meta.height for r in records), np.int32, n), views)[:, None]
    width = np.repeat(np.fromiter((r.meta.width for r in records), np.int32, n), views)[:, None]
    columns = np.broadcast_arrays(begin, end - begin, plan.rows, height, width, 3)
    strips = plan.strips.reshape(n, views * slots)
    for record, first, last in zip(records, strips.min(axis=1).tolist(), strips.max(axis=1).tolist(), strict=True):
        _check_strips(record, first, last)
    return {
        "strips": [r.array for r in records],
        "slots": np.stack(columns, axis=-1, dtype=np.int32).reshape(n, views, slots, 6),
        "order": plan.order.reshape(n, views, -1),
    }


def _check_strips(record: VideoRecord, first: int, last: int) -> None:
    """Checks strips first..last of a record that were not checked before; a damaged one sets `record.problem`.

    Once per strip and run (local shards are indexed once; streamed ones are read afresh, and checked again, each
    pass): checking every read would cost more than the 10 us a sample the loader allows itself (docs/pipeline.md)."""
    wanted = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
    if record.checked & wanted == wanted or record.problem is not None:
        return
    for strip in range(first, last + 1):
        if record.checked >> strip & 1:
            continue
        problem = strip_problem(record.meta, record.media, record.offsets, strip)
        if problem:
            record.problem = problem
            return
        record.checked |= 1 << strip


def _video_columns(records: Sequence[VideoRecord], indices: np.ndarray) -> Batch:
    for record in records:
        if not record.checked and record.problem is None:
            record.problem = video_problem(record.meta, record.media)
            record.checked = 1
    return {
        "video": [r.array for r in records],
        "frames": indices.reshape(len(records), -1).astype(np.int32),
    }


def augment_draws(rng: np.random.Generator, n: int, num_views: int, augment: AugmentConfig | None) -> Batch:
    """Every random choice for n training samples: per view, the crop window's place and, with `augment`, whether
    each augmentation applies and its parameter (`augment.draw_layout`: the same uniform draws either way)."""
    table, values, choices = list(AUGMENTATIONS.values()), ranged(), chosen()
    u = rng.random((n, num_views, len(draw_layout())), np.float32)
    crop, value, coin, choice = np.split(u, np.cumsum([len(CROP), len(values), len(table)]), axis=-1)
    if augment is None:
        return {"value": np.ascontiguousarray(crop)}
    ranges = np.array([augment.ranges()[a.name] for a in values], np.float32).reshape(-1, 2)
    p = np.array([augment.chances()[a.name] for a in table], np.float32)
    sizes = np.array([len(a.choices) for a in choices], np.float32)
    return {
        "value": np.concatenate([crop, ranges[:, 0] + value * (ranges[:, 1] - ranges[:, 0])], axis=-1),
        "coin": coin < p,
        "choice": np.minimum((choice * sizes).astype(np.int32), sizes.astype(np.int32) - 1),
    }


# -- batches ------------------------------------------------------------------------------------------------------


def passes(reader: PartReader, rng: np.random.Generator, endless: bool = False) -> Iterator[VideoRecord]:
    """One pass over a rank's part (an epoch: each usable sample once, a shard that fails given up for the rest of
    it), or endless passes (a benchmark's stream); each in a fresh random shard order (in the listed order when
    ranks split shards by sample, so that their parts stay disjoint)."""
    urls = reader.part.urls
    while True:
        usable = 0
        order = rng.permutation(len(urls)) if reader.part.stride == 1 else None
        for record in reader.records(order):
            usable += 1
            yield record
        if not usable:
            raise RunFailed(
                f"no usable sample in {len(urls)} shard(s), first {urls[0]} ({reader.stats.skipped} skipped as damaged "
                "or unreadable, named above): check the shards, or run `python cli.py preprocess verify` on them"
            )
        if not endless:
            return


def shuffled(records: Iterable[VideoRecord], size: int, rng: np.random.Generator) -> Iterator[VideoRecord]:
    """webdataset's shuffle buffer: once `size` records are held, each new one sends out a random held one; when
    the records end, those still held go out in random order."""
    held: list[VideoRecord] = []
    draws = iter(())

    def pick() -> VideoRecord:
        nonlocal draws
        u = next(draws, None)
        if u is None:
            draws = iter(rng.random(1024).tolist())
            u = next(draws)
        i = int(u * len(held))
        held[i], held[-1] = held[-1], held[i]
        return held.pop()

    for record in records:
        held.append(record)
        if len(held) >= size:
            yield pick()
    while held:
        yield pick()


def train_batches(
    reader: PartReader,
    layout: InputLayout,
    batch_size: int,
    rng: np.random.Generator,
    *,
    shuffle_buffer: int,
    same_clip: bool,
    augment: AugmentConfig | None,
    stats: SourceStats,
    endless: bool = False,
) -> Iterator[Batch]:
    """The batches of training inputs of one pass over the rank's shards (endless passes with `endless`): samples
    mixed in a shuffle buffer, each view a clip at its own random start (or one clip for both views), a random
    crop window per clip and, with `augment`, the paper's augmentations. A sample found broken is skipped and the
    next one takes its place; the samples left at the end of the pass that make no whole batch are not used."""
    records = shuffled(passes(reader, rng, endless), shuffle_buffer, rng)
    views = layout.num_views
    while True:
        parts: list[Batch] = []
        missing = batch_size
        while missing:
            chosen = list(itertools.islice(records, missing))
            if len(chosen) < missing:
                return
            frames = np.fromiter((r.meta.frames for r in chosen), np.int64, missing)
            draws = rng.random((missing, 1 if same_clip else views))
            starts = random_starts(frames, layout.clip_len, draws, layout.frame_stride)
            columns, ok = clip_columns(layout, chosen, np.repeat(starts, views, axis=1) if same_clip else starts, stats)
            if not ok.all():
                _skip_broken(chosen, ok, stats)
                columns = _rows(columns, ok)
            parts.append(columns)
            missing -= int(ok.sum())
        batch = _concat(parts)
        batch.update(augment_draws(rng, batch_size, views, augment))
        yield batch


SPATIAL_CROPS = {1: (0.5,), 3: (0.0, 0.5, 1.0)}  # crop window places along a frame's long side


def eval_batches(
    reader: PartReader,
    layout: InputLayout,
    batch_size: int,
    clips_per_video: int,
    stats: SourceStats,
    spatial_crops: int = 1,
) -> Iterator[Batch]:
    """Every video of the rank's part once, in order, as `clips_per_video` uniformly spaced clips, each seen
    through `spatial_crops` windows: the centre, or (3) both ends and the centre of the frame's long side, the
    Kinetics protocol. The last batch may be short; a broken video is skipped whole."""
    places = np.array(SPATIAL_CROPS[spatial_crops], np.float32)
    per_video = clips_per_video * len(places)

    def groups() -> Iterator[list[VideoRecord]]:  # enough videos for a batch of clips
        group: list[VideoRecord] = []
        for record in reader.records():
            group.append(record)
            if len(group) * per_video >= batch_size:
                yield group
                group = []
        if group:
            yield group

    rest: Batch | None = None
    for group in groups():
        clips = [r for r in group for _ in range(per_video)]
        starts = np.concatenate(
            [spaced_starts(r.meta.frames, layout.clip_len, clips_per_video, layout.frame_stride) for r in group]
        )
        columns, ok = clip_columns(layout, clips, np.repeat(starts, len(places))[:, None], stats)
        value = np.full((len(clips), 1, len(CROP)), 0.5, np.float32)
        landscape = np.fromiter((r.meta.width >= r.meta.height for r in clips), bool, len(clips))
        along = np.tile(places, len(starts))
        value[:, 0, 0] = np.where(landscape, along, 0.5)  # crop_x
        value[:, 0, 1] = np.where(landscape, 0.5, along)  # crop_y
        columns["value"] = value
        if not ok.all():
            _skip_broken(group, ok[::per_video], stats)
            columns = _rows(columns, ok)
        batch = columns if rest is None else _concat([rest, columns])
        n = len(batch["label"])
        for first in range(0, n - batch_size + 1, batch_size):
            yield _rows(batch, slice(first, first + batch_size))
        rest = _rows(batch, slice(n - n % batch_size, n))
    if rest is not None and len(rest["label"]):
        yield rest


def without_unusable(batch: Batch) -> tuple[Batch, list[VideoRecord]]:
    """The batch without the rows of videos found unusable after it was made (a decoder failed on them), and
    those videos."""
    records = batch[RECORDS]
    ok = np.fromiter((r.problem is None for r in records), bool, len(records))
    if ok.all():
        return batch, []
    return _rows(batch, ok), list({id(r): r for r, fine in zip(records, ok.tolist(), strict=True) if not fine}.values())


def _skip_broken(records: Sequence[VideoRecord], ok: np.ndarray, stats: SourceStats) -> None:
    for record, fine in zip(records, ok.tolist(), strict=True):
        if not fine:
            stats.skip(record.where, record.problem or "unusable")


def _rows(batch: Batch, rows: np.ndarray | slice) -> Batch:
    """The rows `rows` (a mask or a slice) of every column."""
    if isinstance(rows, slice):
        return {k: v[rows] for k, v in batch.items()}
    picked = np.flatnonzero(rows).tolist()
    return {k: [v[i] for i in picked] if isinstance(v, list) else v[rows] for k, v in batch.items()}


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return {
        k: [x for p in parts for x in p[k]] if isinstance(v, list) else np.concatenate([p[k] for p in parts])
        for k, v in parts[0].items()
    }


class LoaderStalled(RunFailed):
    """No batch for the loader's --loader.stall-timeout."""


class BackgroundBatches:
    """Runs a batch iterator in a thread, `depth` batches ahead; calling it returns the next batch and raises
    StopIteration at the end. Errors are re-raised here, in the caller's thread.

    With `stall_timeout`, a watchdog: a call that waits that long raises LoaderStalled, naming the shard `reader`
    is reading (a stream that stalls, a hung network disk)."""

    _END = object()

    def __init__(
        self,
        make: Callable[[], Iterator[Batch]],
        depth: int = 4,
        stall_timeout: float | None = None,
        reader: PartReader | None = None,
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stall_timeout, self._reader = stall_timeout, reader
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="dali-skd-source")
        self._thread.start()

    def _run(self, make: Callable[[], Iterator[Batch]]) -> None:
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

    def __call__(self) -> Batch:
        item = self._get()
        if item is self._END:
            self._queue.put(item)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def _get(self) -> object:
        try:
            return self._queue.get(timeout=self._stall_timeout)
        except queue.Empty:
            raise LoaderStalled(self._stalled()) from None

    def _stalled(self) -> str:
        reading = self._reader.reading if self._reader else None
        doing = f"while reading {reading}" if reading else "between shards"
        return (
            f"the loader produced no batch for {self._stall_timeout:g} s (--loader.stall-timeout), {doing}: check "
            "that the storage answers (open the URL, run the pipe: command, or list the folder by hand), or raise "
            "--loader.stall-timeout"
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
