"""Shards to PyTorch. A loader builds its DALI pipeline once, for the whole run; each epoch hands the pipeline a
fresh host-side source and resets it at the end.

`TrainLoader.epoch(e)` yields `steps_per_epoch` `TrainBatch`es; `EvalLoader.epoch()` yields `EvalBatch`es holding
each video of the split once. Every training epoch is a pure function of (seed, epoch, rank): the shard order,
the clips, the shuffle and every augmentation draw come from one generator seeded with them, so a run resumed at
an epoch boundary sees exactly the data an uninterrupted run would have seen.

On a GPU the outputs stay where DALI wrote them: they are bound to PyTorch's current stream (`pipe.run(stream)`)
and handed over through DLPack, and DALI frees a buffer only once PyTorch has dropped the tensor.

A strip DALI cannot decode (the mixed decoder on a GPU, or the CPU decoder on a bogus Huffman table, in shards
without checksums) stops the pipeline with "Failed to decode sample #k". The loader maps k back to the video of
row k of the batch that failed (the oldest one fed and not yet output: DALI outputs batches in order), marks it
bad, rebuilds the pipeline and feeds it that batch without the video, then the batches that were in flight: the
run goes on, and no other sample is lost or repeated.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dali_skd.config import AugmentConfig, ClipConfig, LoaderConfig, SamplingConfig
from dali_skd.data.checks import admission_problem
from dali_skd.data.holdout import Subset
from dali_skd.data.pipeline import CONCURRENCY, DecoderOptions, clip_pipeline
from dali_skd.data.shards import (
    PartReader,
    SourceStats,
    VideoRecord,
    is_remote,
    load_manifest,
    rank_part,
    sample_frames,
    split_urls,
)
from dali_skd.data.source import (
    RECORDS,
    BackgroundBatches,
    Batch,
    InputLayout,
    eval_batches,
    train_batches,
    video_id,
    without_unusable,
)
from dali_skd.errors import ConfigError, InputError, RunFailed
from dali_skd.format import MANIFEST_NAME, FormatError, check_key
from dali_skd.runtime import TORCH_DTYPES, Runtime, local_cpu_share

log = logging.getLogger(__name__)

_FAILED_SAMPLE = re.compile(r"Failed to decode sample #(\d+)")


def dali_threads(requested: int, decoders: int = 0, concurrency: str = "backend") -> int:
    """A pipeline's `num_threads`: as asked, else this process's share of the cores (torchrun runs several per
    machine), at most 16. It sizes the pool of the CPU operators and, on a GPU, each mixed JPEG decoder's own pool.
    Under DALI's default executor (operator concurrency `backend`) the mixed operators take turns, one at a time,
    so each decoder's pool gets the whole share; with `full` the pipeline's `decoders` run side by side and share
    it (docs/pipeline.md, "One decoder per view and strip slot")."""
    if requested > 0:
        return requested
    if concurrency == "full" and decoders:
        return max(1, local_cpu_share() // decoders)
    return min(16, local_cpu_share())


EXECUTOR_THREADS = "DALI_EXEC2_NUM_THREADS"  # DALI reads it once per process, when it builds its first pipeline


def executor_threads_needed(decoders: int, num_views: int) -> int:
    """DALI_EXEC2_NUM_THREADS for `concurrency full`: every mixed decoder, each view's GPU operators and the CPU
    operators (which DALI runs one at a time) at once."""
    return decoders + num_views + 1


def _ask_executor_threads(needed: int) -> None:
    """Without DALI_EXEC2_NUM_THREADS, DALI 2.4 runs at most min(num_threads, 4) operators at once, whatever the
    concurrency: set it when it is not set, say so when it is set too low."""
    value = os.environ.get(EXECUTOR_THREADS, "")
    if not value:
        os.environ[EXECUTOR_THREADS] = str(needed)
    elif not value.isdigit() or int(value) < needed:
        log.warning(
            "%s=%s: with --loader.concurrency full, up to %d of this pipeline's operators run at once; set it to %d "
            "before the process starts", EXECUTOR_THREADS, value, needed, needed,
        )  # fmt: skip


def held_out_split(splits: list[str]) -> str:
    """The split evaluation reads unless told: the held-out one (`test`, or `val` for Kinetics)."""
    held_out = [s for s in splits if s != "train"]
    if not held_out:
        raise ConfigError("the dataset has no held-out split (test or val) to evaluate on: pass --split")
    return held_out[0]


def process_threads() -> int | None:
    """The threads this process holds now (None where /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


@dataclass
class TrainBatch:
    views: list[torch.Tensor]  # num_views tensors of N x 3 x T x crop x crop
    labels: torch.Tensor  # N, int64


@dataclass
class EvalBatch:
    clips: torch.Tensor  # N clips x 3 x T x crop x crop (several clips per video)
    labels: torch.Tensor
    video_ids: torch.Tensor  # each clip's video (`source.video_id`: its split and its index there)


class _Feed:
    """The pipeline's external source: the current epoch's batches, replaced at every epoch. It remembers the
    batches DALI took and has not output yet (`pending`, oldest first), and leaves out the rows of videos found
    unusable after their batch was made, counting each such video (once an epoch: `SourceStats`)."""

    def __init__(self, stats: SourceStats) -> None:
        self._next: Callable[[], Batch] | None = None
        self._stats = stats
        self._replay: deque[Batch] = deque()
        self.pending: deque[Batch] = deque()
        self.source_error: BaseException | None = None

    def start(self, batches: Callable[[], Batch]) -> None:
        self._next = batches
        self.pending.clear()

    def replay(self, batches: Iterable[Batch]) -> None:
        """Feed `batches` again, before the source's next ones (a rebuilt pipeline's first inputs)."""
        self._replay.extend(batches)
        self.pending.clear()

    def stop(self) -> None:
        self._next = None
        self._replay.clear()

    def output(self) -> Batch:
        """The batch DALI has just output."""
        return self.pending.popleft()

    def __call__(self) -> Batch:
        if self._next is None:
            raise StopIteration
        while True:
            try:
                batch = self._replay.popleft() if self._replay else self._next()
            except BaseException as e:  # the source's own error, not DALI's: told apart by the loader
                self.source_error = e
                raise
            batch, unusable = without_unusable(batch)
            for record in unusable:
                self._stats.skip(record.where, record.problem or "unusable")
            if len(batch["label"]):
                self.pending.append(batch)
                return batch


class ClipLoader:
    """What training and evaluation loaders share: the split's shards of `data` (or `shards`) for the rank of
    `runtime` (only the videos of `subset` when given), the host side, and one DALI pipeline, built the first time it
    is needed, cutting clips as `clip` says and running as `loader` says (each by default as their defaults say), its
    clips handed over as `runtime` says."""

    def __init__(
        self,
        data: str,
        split: str | None,
        *,
        clip: ClipConfig | None,
        loader: LoaderConfig | None,
        shards: str | None,
        batch_size: int,
        num_views: int,
        augment: AugmentConfig | None,
        with_video_id: bool,
        runtime: Runtime,
        subset: Subset | None = None,
    ) -> None:
        self.data, self.clip, self.loader = data, clip or ClipConfig(), loader or LoaderConfig()
        clip, loader = self.clip, self.loader
        self.batch_size, self.augment, self.runtime = batch_size, augment, runtime
        self.device, self.rank, self.world = runtime.device, runtime.rank, runtime.world
        self.manifest = load_manifest(data, loader.read_timeout)
        self.split = split = split or held_out_split(list(self.manifest.splits))
        self.subset = subset  # only these videos of the split (`holdout`): a validation part of the training split
        self.num_videos = subset.samples if subset else self.manifest.split(split, data).samples
        if self.manifest.short_side < clip.crop:
            raise FormatError(
                f"{data}: frames are stored at short side {self.manifest.short_side}, smaller than the "
                f"{clip.crop}-pixel crop: re-run preprocess with a larger --short-side, or lower --clip.crop"
            )
        self.urls = split_urls(data, self.manifest, split, shards)
        self.part = rank_part(self.urls, runtime.rank, runtime.world)
        self.layout = InputLayout(
            self.manifest.format,
            num_views,
            clip.length,
            self.manifest.frames_per_jpeg,
            augmented=augment is not None,
            with_video_id=with_video_id,
            frame_stride=clip.frame_stride,
            splits=tuple(self.manifest.splits),
        )
        self.stats = SourceStats()
        # the frames of each video of each local shard (every rank reads all the split's, so all agree)
        self.video_frames = {url: sample_frames(url) for url in self.urls if not is_remote(url)}
        self.shard_samples = self._shard_samples(shards)
        self.reader = PartReader(
            self.part, self.stats, self.layout.media_ext, self._admit, loader.read_timeout, self.shard_samples, subset
        )
        self.pipeline_builds = 0
        self.build_seconds = 0.0  # of the last build
        self.undecodable: dict[str, str] = {}  # "shard: key" -> why: the videos DALI's decoders failed on
        self._failed: list[VideoRecord] = []  # those of them found by this loader
        # mixed decoders, one per view and strip slot (one for all views for vp9), each with its own thread pool
        self.decoders = self.layout.num_views * self.layout.slots if self.layout.format == "jpeg" else 1
        gpu = self.device.type == "cuda"
        self.num_threads = dali_threads(loader.threads, self.decoders if gpu else 0, loader.concurrency)
        if gpu and loader.concurrency == "full":
            _ask_executor_threads(executor_threads_needed(self.decoders, self.layout.num_views))
        self._feed = _Feed(self.stats)
        self._pipe = None
        self._dropped: str | None = None  # why the last pipeline was dropped: the next one is built in its place

    def _shard_samples(self, shards: str | None) -> dict[str, int]:
        """The samples each shard holds, where known: local ones are counted from their tar headers; remote ones
        are the manifest's count, unless the user named the shards (`shards`)."""
        if self.video_frames:
            return {url: len(frames) for url, frames in self.video_frames.items()}
        if shards:
            return {}
        listed = self.manifest.split(self.split, self.data).shards
        return {url: info.samples for url, info in zip(self.urls, listed, strict=True)}

    def _admit(self, record: VideoRecord) -> str | None:
        """Why a sample cannot be used: it does not fit the pipeline's layout, or does not belong to the dataset."""
        return admission_problem(record.key, record.meta, self.manifest)

    def _pipeline(self):
        if self._pipe is None:
            gpu = self.device.type == "cuda"
            started = time.perf_counter()
            self._pipe = clip_pipeline(
                source=self._feed,
                layout=self.layout,
                crop=self.clip.crop,
                augment=self.augment,
                dtype="fp32" if self.runtime.precision == "fp32" else "fp16",  # DALI has no bf16: cast on the device
                gpu=gpu,
                in_flight=self.loader.prefetch + 2,
                input_norm=self.clip.norm,
                decoder_options=self._decoder_options(),
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                concurrency=CONCURRENCY[self.loader.concurrency],
                device_id=self.device.index if gpu else None,
                prefetch_queue_depth=self.loader.prefetch,
                clip_layout="FHWC" if self.runtime.channels_last else "CFHW",
            )
            with warnings.catch_warnings():
                # the draws of an augmentation with probability 0 or 1 are not read: by design, not worth a warning
                warnings.filterwarnings("ignore", "The external source node .* not used", Warning)
                self._pipe.build()
            self.pipeline_builds += 1
            self.build_seconds = time.perf_counter() - started
            if self._dropped is not None:
                log.warning(
                    "%s, split %s: rebuilt the DALI pipeline in %.1f s (%s)",
                    self.data, self.split, self.build_seconds, self._dropped,
                )  # fmt: skip
                self._dropped = None
        return self._pipe

    def _decoder_options(self) -> DecoderOptions:
        """The GPU decoders' settings; -1 hints: a strip of this dataset in a 16:9 frame."""
        short, fpj = self.manifest.short_side, max(self.manifest.frames_per_jpeg, 1)
        width, height = self.loader.preallocate_width_hint, self.loader.preallocate_height_hint
        return DecoderOptions(
            hw_decoder_load=self.loader.hw_decoder_load,
            preallocate_width_hint=math.ceil(short * 16 / 9) if width < 0 else width,
            preallocate_height_hint=fpj * short if height < 0 else height,
        )

    def _run(self, make: Callable[[], Iterator[Batch]]) -> Iterator[dict[str, torch.Tensor]]:
        """The pipeline's outputs, by name, for the host batches `make()` produces; the pipeline is reset at the
        end, or after draining what it prefetched when the caller stops early. A video DALI cannot decode is
        skipped (`_skip_undecodable`)."""
        source = BackgroundBatches(make, self.loader.prefetch + 2, self.loader.stall_timeout, self.reader)
        self._feed.start(source)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        ended = failed = False
        try:
            while True:
                try:
                    outputs = self._next_outputs(stream)
                except StopIteration:
                    ended = True
                    return
                except RuntimeError as e:
                    if e is self._feed.source_error:
                        raise
                    self._skip_undecodable(e)
                    continue
                self._feed.output()
                self._check_unusable()
                yield {name: self._to_torch(o) for name, o in zip(self.layout.outputs, outputs, strict=True)}
        except GeneratorExit:  # the caller stopped early
            raise
        except BaseException:
            failed = True
            raise
        finally:
            source.close()
            self._feed.stop()
            if failed:
                self._drop_pipeline("the last one raised an error")  # never reused
            elif self._pipe is not None:
                try:
                    if not ended:
                        _drain(self._pipe)
                    self._pipe.reset()
                except RuntimeError:  # the next epoch builds afresh
                    self._drop_pipeline("a batch the last one had prefetched failed to decode")

    def _drop_pipeline(self, why: str) -> None:
        self._pipe, self._dropped = None, why

    def _next_outputs(self, stream: torch.cuda.Stream | None) -> tuple:
        """The pipeline's next outputs. No local of the caller holds the pipeline: once it fails and is dropped,
        nothing keeps its decoders (their thread pools, the GPU's preallocated buffers) alive while the next one is
        built."""
        pipe = self._pipeline()
        return pipe.run(stream.cuda_stream) if stream is not None else pipe.run()

    def _skip_undecodable(self, error: RuntimeError) -> None:
        """After DALI failed to decode sample #k of the oldest batch in flight: marks that row's video bad, drops the
        pipeline (DALI does not run one that failed again) and feeds the next one that batch without the video,
        then the other batches in flight. An error that names no row of it is raised again, naming its shards."""
        message = str(error)
        failed = self._feed.pending[0][RECORDS] if self._feed.pending else []
        match = _FAILED_SAMPLE.search(message)
        if match is None or int(match[1]) >= len(failed):
            shards = sorted({r.shard for batch in self._feed.pending for r in batch[RECORDS]})
            detail = next((line for line in reversed(message.splitlines()) if "rror" in line or "ailed" in line), "")
            raise RunFailed(
                f"the DALI pipeline failed on a batch from {', '.join(shards) or 'no known shard'}"
                f"{f' ({detail.strip()})' if detail else ''}: run `python cli.py preprocess verify {self.data}` "
                "to find damaged samples (DALI_SKD_DEBUG=1 shows DALI's whole message)"
            ) from error
        record = failed[int(match[1])]
        reason = "DALI could not decode it (a damaged strip its header check does not see)"
        record.problem = self.reader.known_bad[record.key] = reason  # streamed shards: their next records too
        self.undecodable[f"{record.shard}: {record.key}"] = reason
        self._failed.append(record)
        self._drop_pipeline("the last one failed to decode a sample, and DALI does not run a failed pipeline again")
        self._feed.replay(list(self._feed.pending))  # the feed leaves the video's rows out, and counts it once
        self._check_unusable()

    def _check_unusable(self) -> None:
        if self.stats.unusable > self.loader.max_bad_samples:
            examples = "; ".join(self.stats.examples[:5])
            raise RunFailed(
                f"{self.stats.unusable} samples of {self.split} could not be used, more than --loader.max-bad-samples "
                f"{self.loader.max_bad_samples} (first: {examples}): run `python cli.py preprocess verify "
                f"{self.data}` to list every damaged one, then re-run preprocess for them (or raise the limit)"
            )

    def undecodable_ids(self) -> set[int]:
        """The ids of the videos this loader's decoder failed on: evaluation drops them, whatever clips of them it
        scored before (a video's clips may span batches)."""
        return {video_id(record.key, self.layout.splits) for record in self._failed}

    def mark_undecodable(self, samples: list[str], where: str) -> None:
        """Skip these videos ("shard: key", as `undecodable` lists them; from the checkpoint `where`) from the start,
        as the run that found them did after it found them: a resumed run sees the batches of an uninterrupted one."""
        try:
            if not isinstance(samples, list) or not all(isinstance(sample, str) for sample in samples):
                raise ValueError("not a list of 'shard: key' strings")
            keys = [check_key(sample.rsplit(": ", 1)[-1]) for sample in samples]
        except ValueError as e:
            raise InputError(
                f"{where}: bad_samples {str(samples)[:80]} ({e}): resume from a checkpoint of a run"
            ) from e
        reason = "DALI could not decode it in an earlier run (a damaged strip its header check does not see)"
        for sample, key in zip(samples, keys, strict=True):
            self.reader.known_bad[key] = self.undecodable[sample] = reason

    def _to_torch(self, output) -> torch.Tensor:
        """A DALI output as a torch tensor on the training device, without a copy (DLPack). On the CPU, labels and
        video ids are the host's own arrays passed through, held only while DALI needs them: those bytes are
        copied. Views emitted FHWC are permuted to N x C x T x H x W: channels_last_3d memory, no copy."""
        tensor = torch.from_dlpack(output.as_tensor())
        if not tensor.is_floating_point():
            return tensor if tensor.is_cuda else tensor.to(self.device, copy=True)
        if tensor.dtype != TORCH_DTYPES[self.runtime.precision]:
            tensor = tensor.to(TORCH_DTYPES[self.runtime.precision])
        if self.runtime.channels_last:
            tensor = tensor.permute(0, 4, 1, 2, 3)
        return tensor.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._pipe = None


def _part_samples(urls: list[str], counts: list[int], rank: int, world: int) -> int:
    """The samples of `rank`'s part (`shards.rank_part`), from the samples of each shard."""
    part = rank_part(urls, rank, world)
    if part.stride == 1:
        held = dict(zip(urls, counts, strict=True))
        return sum(held[url] for url in part.urls)
    return len(range(part.offset, sum(counts), part.stride))


def _drain(pipe) -> None:
    """Runs out what the pipeline prefetched, so that a reset starts the next epoch clean."""
    while True:
        try:
            pipe.run()
        except StopIteration:
            return


class TrainLoader(ClipLoader):
    """Training batches of `num_views` augmented views per video for one rank: `steps_per_epoch` per epoch, the same
    number on every rank."""

    def __init__(
        self,
        data: str,
        split: str = "train",
        *,
        clip: ClipConfig | None = None,
        loader: LoaderConfig | None = None,
        sampling: SamplingConfig | None = None,
        shards: str | None = None,
        batch_size: int,
        num_views: int = 1,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        runtime: Runtime | None = None,
        subset: Subset | None = None,
    ) -> None:
        super().__init__(
            data, split, clip=clip, loader=loader, shards=shards, batch_size=batch_size, num_views=num_views,
            augment=augment, with_video_id=False, runtime=runtime or Runtime(), subset=subset,
        )  # fmt: skip
        self.sampling, self.seed = sampling or SamplingConfig(), seed
        self.epoch_samples = self._epoch_samples(split, shards)
        self.least_samples = self._least_samples()
        self.steps_per_epoch = self.least_samples // batch_size
        self._classes_checked = False

    def _epoch_samples(self, split: str, shards: str | None) -> int:
        """The samples an epoch goes through: those the shards hold where they are counted, else the manifest's; of a
        subset, those it holds."""
        if len(self.shard_samples) < len(self.urls) or self.subset is not None:
            return self.num_videos
        found = sum(self.shard_samples.values())
        if found != self.num_videos and not shards:
            log.warning(
                "%s/%s says split %s holds %d samples, but its shards hold %d: an epoch goes through the %d found",
                self.data, MANIFEST_NAME, split, self.num_videos, found, found,
            )  # fmt: skip
        return found

    def _least_samples(self) -> int:
        """The samples of the part of the rank that reads the fewest: an epoch is as many whole batches of them, so
        that every rank makes as many from one pass over its part (an epoch ends sooner where samples are lost)."""
        counts = [self.shard_samples.get(url) for url in self.urls]
        if None in counts or self.subset is not None:  # named remote shards, or a subset: spread as evenly as can be
            return self.epoch_samples // self.world
        return min(_part_samples(self.urls, counts, rank, self.world) for rank in range(self.world))

    def check_epochs(self) -> None:
        """What training refuses before it starts (a benchmark's endless stream takes them): a batch larger than a
        rank's part, which would be made of samples repeated; a clip longer than most videos (`_check_clip_span`)."""
        if not self.steps_per_epoch:
            least, world = self.least_samples, self.world
            each = f"each of {world} processes reads {least}" if world > 1 else f"it holds {least}"
            raise ConfigError(
                f"--batch-size {self.batch_size} is larger than split {self.split} of {self.data} ({each} samples): "
                f"lower --batch-size to {max(least, 1)} or less"
            )
        self._check_clip_span(self.split)

    def _check_clip_span(self, split: str) -> None:
        """A clip longer than most videos of the split is refused: each such video is looped to fill it, decoding
        the same frames again (--clip.length 1000 on videos of 125 frames: 5 min an epoch, against 9 s). Some
        videos shorter than a clip are said, with their count; streamed shards are judged by the manifest's mean."""
        clip = self.clip
        span = (clip.length - 1) * clip.frame_stride + 1
        frames = [f for shard in self.video_frames.values() for f in shard if f]
        flags = f"--clip.length {clip.length}" + (
            f" x --clip.frame-stride {clip.frame_stride}" * (clip.frame_stride > 1)
        )
        if not frames:
            info = self.manifest.split(split, self.data)
            mean = info.frames / max(info.samples, 1)
            if span > mean:
                log.warning(
                    "%s spans %d frames, more than the %.0f frames the videos of split %s hold on average (the "
                    "manifest's count): the shorter ones are looped to fill their clips", flags, span, mean, split,
                )  # fmt: skip
            return
        shorter = sum(f < span for f in frames)
        median = int(np.median(frames))
        if 2 * shorter > len(frames):
            raise ConfigError(
                f"{flags} spans {span} frames, more than {shorter} of the {len(frames)} videos of split {split} of "
                f"{self.data} hold (median {median} frames): each would be looped to fill its clips, decoding the "
                f"same frames again; lower {' or '.join(f for f in flags.split() if f.startswith('--'))} (a clip of "
                f"{median} frames fits half of them)"
            )
        if shorter:
            log.warning(
                "%d of the %d videos of split %s are shorter than a clip (%s: %d frames): they are looped to fill it",
                shorter, len(frames), split, flags, span,
            )  # fmt: skip

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        """The batches of epoch `epoch` (from 0), from step `start_step` on: the earlier ones are made on the host
        and dropped before the pipeline decodes them, so a run resumed mid-epoch sees the rest of the very batches
        an uninterrupted one would."""
        return self._batches(epoch, self.steps_per_epoch, start_step)

    def stream(self, epoch: int = 0) -> Iterator[TrainBatch]:
        """Endless batches continuing epoch `epoch`'s draws, for benchmarks."""
        return self._batches(epoch, None)

    def host_batches(self, epoch: int, steps: int | None, start_step: int = 0) -> Iterator[Batch]:
        """The host side's batches of epoch `epoch`: steps `start_step` to `steps` of its one pass over the shards
        (fewer where samples were lost), or endless batches of endless passes with None."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank]))
        batches = train_batches(
            self.reader, self.layout, self.batch_size, rng, shuffle_buffer=self.sampling.shuffle_buffer,
            same_clip=self.sampling.same_clip, augment=self.augment, stats=self.stats, endless=steps is None,
        )  # fmt: skip
        return itertools.islice(batches, start_step, steps)

    def _batches(self, epoch: int, steps: int | None, start_step: int = 0) -> Iterator[TrainBatch]:
        for out in self._run(lambda: self.host_batches(epoch, steps, start_step)):
            yield TrainBatch([out[f"view{v}"] for v in range(self.layout.num_views)], out["label"])
        if steps is not None and not self._classes_checked:
            self._classes_checked = True
            self._check_classes()

    def _check_classes(self) -> None:
        """After the first epoch: a manifest with more classes than its labels use trains outputs nothing teaches."""
        classes = self.manifest.classes
        unused = [name for label, name in enumerate(classes) if label not in self.stats.labels]
        if unused:
            log.warning(
                "%s/%s lists %d classes, but the first epoch's samples (rank %d) used the labels of only %d; never "
                "seen: %s: check the manifest's class list",
                self.data, MANIFEST_NAME, len(classes), self.rank, len(classes) - len(unused),
                ", ".join(unused[:10]) + (f" and {len(unused) - 10} more" if len(unused) > 10 else ""),
            )  # fmt: skip


class EvalLoader(ClipLoader):
    """Evaluation batches: each video of the split (default: the held-out one) exactly once over all ranks, as
    `clips_per_video` clips, each through `spatial_crops` windows (1: the centre; 3: both ends and the centre of the
    long side); the last batch may be short."""

    def __init__(
        self,
        data: str,
        split: str | None = None,
        *,
        clip: ClipConfig | None = None,
        loader: LoaderConfig | None = None,
        shards: str | None = None,
        batch_size: int,
        clips_per_video: int = 10,
        spatial_crops: int = 1,
        runtime: Runtime | None = None,
        subset: Subset | None = None,
    ) -> None:
        super().__init__(
            data, split, clip=clip, loader=loader, shards=shards, batch_size=batch_size, num_views=1, augment=None,
            with_video_id=True, runtime=runtime or Runtime(), subset=subset,
        )  # fmt: skip
        self.clips_per_video = clips_per_video
        self.spatial_crops = spatial_crops

    def epoch(self) -> Iterator[EvalBatch]:
        def make() -> Iterator[Batch]:
            return eval_batches(
                self.reader, self.layout, self.batch_size, self.clips_per_video, self.stats, self.spatial_crops
            )

        for out in self._run(make):
            yield EvalBatch(out["view0"], out["label"], out["video_id"])
