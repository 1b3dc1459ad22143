"""Shards to PyTorch. A loader builds its DALI pipeline once, for the whole run; each epoch hands the pipeline a
fresh host-side source and resets it at the end.

`TrainLoader.epoch(e)` yields `steps_per_epoch` `TrainBatch`es; `EvalLoader.epoch()` yields `EvalBatch`es holding
each video of the split once. Every training epoch is a pure function of (seed, epoch, rank): the shard order,
the clips, the shuffle and every augmentation draw come from one generator seeded with them, so a run resumed at
an epoch boundary sees exactly the data an uninterrupted run would have seen.

On a GPU the outputs stay where DALI wrote them: they are bound to PyTorch's current stream (`pipe.run(stream)`)
and handed over through DLPack, and DALI frees a buffer only once PyTorch has dropped the tensor.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dali_skd.config import AugmentConfig, LoaderConfig
from dali_skd.data.pipeline import DecoderOptions, clip_pipeline
from dali_skd.data.shards import PartReader, SourceStats, load_manifest, rank_part, split_urls
from dali_skd.data.source import SPATIAL_CROPS, BackgroundBatches, Batch, InputLayout, eval_batches, train_batches
from dali_skd.format import FormatError
from dali_skd.runtime import TORCH_DTYPES, local_cpu_share, resolve_device


def dali_threads(requested: int) -> int:
    """DALI CPU threads: as asked, else this process's share of the cores (torchrun runs several per machine)."""
    return requested if requested > 0 else min(16, local_cpu_share())


@dataclass
class TrainBatch:
    views: list[torch.Tensor]  # num_views tensors of N x 3 x T x crop x crop
    labels: torch.Tensor  # N, int64


@dataclass
class EvalBatch:
    clips: torch.Tensor  # N clips x 3 x T x crop x crop (several clips per video)
    labels: torch.Tensor
    video_ids: torch.Tensor  # the index of each clip's video within its split


class _Feed:
    """The pipeline's external source: the current epoch's batches, replaced at every epoch."""

    def __init__(self) -> None:
        self._next: Callable[[], Batch] | None = None

    def start(self, batches: Callable[[], Batch]) -> None:
        self._next = batches

    def stop(self) -> None:
        self._next = None

    def __call__(self) -> Batch:
        if self._next is None:
            raise StopIteration
        return self._next()


class ClipLoader:
    """What training and evaluation loaders share: the split's shards for one rank of `world`, the host side,
    and one DALI pipeline, built the first time it is needed."""

    def __init__(
        self,
        cfg: LoaderConfig,
        split: str,
        *,
        shards: str | None,
        batch_size: int,
        num_views: int,
        augment: AugmentConfig | None,
        with_video_id: bool,
        dtype: str,
        device: torch.device | None,
        rank: int,
        world: int,
    ) -> None:
        self.cfg, self.split, self.batch_size, self.augment, self.dtype = cfg, split, batch_size, augment, dtype
        self.rank, self.world = rank, world
        self.device = device if device is not None else resolve_device(cfg.device)
        self.manifest = load_manifest(cfg.data)
        self.num_videos = self.manifest.split(split, cfg.data).samples
        if self.manifest.short_side < cfg.crop:
            raise FormatError(
                f"{cfg.data}: frames are stored at short side {self.manifest.short_side}, smaller than the "
                f"{cfg.crop}-pixel crop: re-run preprocess with a larger --short-side, or lower --crop"
            )
        self.part = rank_part(split_urls(cfg.data, self.manifest, split, shards), rank, world)
        if cfg.frame_stride < 1:
            raise ValueError(f"--frame-stride must be 1 or more, not {cfg.frame_stride}")
        self.layout = InputLayout(
            self.manifest.format,
            num_views,
            cfg.clip_len,
            self.manifest.frames_per_jpeg,
            augmented=augment is not None,
            with_video_id=with_video_id,
            frame_stride=cfg.frame_stride,
        )
        self.stats = SourceStats()
        self.reader = PartReader(self.part, self.stats, self.layout.media_ext, self.layout.admit)
        self.pipeline_builds = 0
        self._feed = _Feed()
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            gpu = self.device.type == "cuda"
            self._pipe = clip_pipeline(
                source=self._feed,
                layout=self.layout,
                crop=self.cfg.crop,
                augment=self.augment,
                dtype="fp32" if self.dtype == "fp32" else "fp16",  # DALI has no bf16: converted on the device
                gpu=gpu,
                in_flight=self.cfg.prefetch + 2,
                input_norm=self.cfg.input_norm,
                decoder_options=self._decoder_options(),
                batch_size=self.batch_size,
                num_threads=dali_threads(self.cfg.threads),
                device_id=self.device.index if gpu else None,
                prefetch_queue_depth=self.cfg.prefetch,
            )
            with warnings.catch_warnings():
                # the draws of an augmentation with probability 0 or 1 are not read: by design, not worth a warning
                warnings.filterwarnings("ignore", "The external source node .* not used", Warning)
                self._pipe.build()
            self.pipeline_builds += 1
        return self._pipe

    def _decoder_options(self) -> DecoderOptions:
        """The GPU decoders' settings; -1 hints: a strip of this dataset in a 16:9 frame."""
        short, fpj = self.manifest.short_side, max(self.manifest.frames_per_jpeg, 1)
        width, height = self.cfg.preallocate_width_hint, self.cfg.preallocate_height_hint
        return DecoderOptions(
            hw_decoder_load=self.cfg.hw_decoder_load,
            preallocate_width_hint=math.ceil(short * 16 / 9) if width < 0 else width,
            preallocate_height_hint=fpj * short if height < 0 else height,
        )

    def _run(self, make: Callable[[], Iterator[Batch]]) -> Iterator[dict[str, torch.Tensor]]:
        """The pipeline's outputs, by name, for the host batches `make()` produces; the pipeline is reset at the
        end, or after draining what it prefetched when the caller stops early."""
        source = BackgroundBatches(make, depth=self.cfg.prefetch + 2)
        pipe = self._pipeline()
        self._feed.start(source)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        ended = failed = False
        try:
            while True:
                try:
                    outputs = pipe.run(stream.cuda_stream) if stream is not None else pipe.run()
                except StopIteration:
                    ended = True
                    return
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
                self._pipe = None  # a pipeline that raised is not reused
            else:
                if not ended:
                    _drain(pipe)
                pipe.reset()

    def _to_torch(self, output) -> torch.Tensor:
        """A DALI output as a torch tensor on the training device, without a copy (DLPack). Labels and video ids
        are the host's own arrays passed through, held only while DALI needs them: those few bytes are copied."""
        tensor = torch.from_dlpack(output.as_tensor())
        if not tensor.is_floating_point():
            return tensor.to(self.device, copy=True)
        if tensor.dtype != TORCH_DTYPES[self.dtype]:
            tensor = tensor.to(TORCH_DTYPES[self.dtype])
        return tensor.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._pipe = None


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
        cfg: LoaderConfig,
        split: str = "train",
        *,
        batch_size: int,
        num_views: int = 1,
        augment: AugmentConfig | None = None,
        dtype: str = "fp32",
        device: torch.device | None = None,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            cfg, split, shards=cfg.train_shards, batch_size=batch_size, num_views=num_views, augment=augment,
            with_video_id=False, dtype=dtype, device=device, rank=rank, world=world,
        )  # fmt: skip
        self.seed = seed
        self.steps_per_epoch = max(1, self.num_videos // (world * batch_size))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        """The batches of epoch `epoch` (from 0), from step `start_step` on: the earlier ones are made on the host
        and dropped before the pipeline decodes them, so a run resumed mid-epoch sees the rest of the very batches
        an uninterrupted one would."""
        return self._batches(epoch, self.steps_per_epoch, start_step)

    def stream(self, epoch: int = 0) -> Iterator[TrainBatch]:
        """Endless batches continuing epoch `epoch`'s draws, for benchmarks."""
        return self._batches(epoch, None)

    def host_batches(self, epoch: int, steps: int | None, start_step: int = 0) -> Iterator[Batch]:
        """The host side's batches of epoch `epoch`: steps `start_step` to `steps`, or endless with None."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank]))
        batches = train_batches(
            self.reader, self.layout, self.batch_size, rng, shuffle_buffer=self.cfg.shuffle_buffer,
            same_clip=self.cfg.same_clip, augment=self.augment, stats=self.stats,
        )  # fmt: skip
        return itertools.islice(batches, start_step, steps)

    def _batches(self, epoch: int, steps: int | None, start_step: int = 0) -> Iterator[TrainBatch]:
        for out in self._run(lambda: self.host_batches(epoch, steps, start_step)):
            yield TrainBatch([out[f"view{v}"] for v in range(self.layout.num_views)], out["label"])


class EvalLoader(ClipLoader):
    """Evaluation batches: each video of the split exactly once over all ranks, as `clips_per_video` clips, each
    through `spatial_crops` windows (1: the centre; 3: both ends and the centre of the long side); the last batch
    may be short."""

    def __init__(
        self,
        cfg: LoaderConfig,
        split: str,
        *,
        batch_size: int,
        clips_per_video: int | None = None,
        spatial_crops: int = 1,
        dtype: str = "fp32",
        device: torch.device | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if spatial_crops not in SPATIAL_CROPS:
            raise ValueError(f"--spatial-crops takes {' or '.join(map(str, SPATIAL_CROPS))}, not {spatial_crops}")
        super().__init__(
            cfg, split, shards=cfg.eval_shards, batch_size=batch_size, num_views=1, augment=None,
            with_video_id=True, dtype=dtype, device=device, rank=rank, world=world,
        )  # fmt: skip
        self.clips_per_video = clips_per_video or cfg.clips_per_video
        self.spatial_crops = spatial_crops

    def epoch(self) -> Iterator[EvalBatch]:
        def make() -> Iterator[Batch]:
            return eval_batches(
                self.reader, self.layout, self.batch_size, self.clips_per_video, self.stats, self.spatial_crops
            )

        for out in self._run(make):
            yield EvalBatch(out["view0"], out["label"], out["video_id"])
