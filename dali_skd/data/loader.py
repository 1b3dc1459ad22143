"""Shards to PyTorch: each epoch builds the Python source and the DALI pipeline, and yields torch tensors on the
training device.

Every epoch is a pure function of (seed, epoch, rank): the shard order, the clips, the shuffle and DALI's
augmentation draws are all seeded from it, so a run resumed at an epoch boundary sees exactly the data an
uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from dali_skd.config import AugmentConfig, LoaderConfig
from dali_skd.data.pipeline import clip_pipeline
from dali_skd.data.shards import SourceStats, load_manifest, rank_part, split_urls
from dali_skd.data.source import BackgroundBatches, InputLayout, eval_batches, train_batches
from dali_skd.format import FormatError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto`: the current CUDA device when there is one, else the CPU. `cuda` without a GPU is an error."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cuda":
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    return torch.device("cpu")


def dali_threads(requested: int) -> int:
    """DALI CPU threads: as asked, else this process's share of the cores (torchrun runs several per machine)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, cores // per_node))


@dataclass
class TrainBatch:
    views: list[torch.Tensor]  # num_views tensors of N x 3 x T x crop x crop
    labels: torch.Tensor  # N, int64


@dataclass
class EvalBatch:
    clips: torch.Tensor  # N clips x 3 x T x crop x crop (several clips per video)
    labels: torch.Tensor
    video_ids: torch.Tensor  # the index of each clip's video within its split


class ClipLoader:
    """Batches of clips from one split, for one rank of `world`.

    Training (`train=True`): `steps_per_epoch` batches of `num_views` augmented views per video, the same number of
    steps on every rank. Evaluation: each video of the split exactly once over all ranks, as `clips_per_video`
    centre-cropped clips; the last batch may be short.
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        split: str,
        *,
        train: bool,
        batch_size: int,
        num_views: int = 1,
        augment: AugmentConfig | None = None,
        clips_per_video: int | None = None,
        dtype: str = "fp32",
        device: torch.device | None = None,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        self.cfg, self.split, self.train = cfg, split, train
        self.batch_size, self.augment, self.dtype, self.seed = batch_size, augment, dtype, seed
        self.rank, self.world = rank, world
        self.device = device if device is not None else resolve_device(cfg.device)
        self.clips_per_video = clips_per_video or cfg.clips_per_video
        self.manifest = load_manifest(cfg.data)
        info = self.manifest.split(split, cfg.data)
        if self.manifest.short_side < cfg.crop:
            raise FormatError(
                f"{cfg.data}: frames are stored at short side {self.manifest.short_side}, smaller than the "
                f"{cfg.crop}-pixel crop: re-run preprocess with a larger --short-side, or lower --crop"
            )
        override = cfg.train_shards if split == "train" else cfg.eval_shards
        self.part = rank_part(split_urls(cfg.data, self.manifest, split, override), rank, world)
        self.layout = InputLayout(
            self.manifest.format, num_views if train else 1, cfg.clip_len, self.manifest.frames_per_jpeg, not train
        )
        self.num_videos = info.samples
        self.steps_per_epoch = max(1, info.samples // (world * batch_size))
        self.stats = SourceStats()

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def _seeds(self, epoch: int) -> tuple[np.random.Generator, int]:
        seq = np.random.SeedSequence([self.seed, epoch, self.rank, int(self.train)])
        return np.random.default_rng(seq), int(seq.generate_state(1)[0] & 0x7FFFFFFF)

    def epoch(self, epoch: int = 0) -> Iterator[TrainBatch | EvalBatch]:
        rng, dali_seed = self._seeds(epoch)
        if self.train:
            make = partial(
                train_batches,
                self.part,
                self.layout,
                self.batch_size,
                rng,
                self.cfg.shuffle_buffer,
                self.cfg.same_clip,
                self.stats,
            )
        else:
            make = partial(eval_batches, self.part, self.layout, self.batch_size, self.clips_per_video, self.stats)
        source = BackgroundBatches(make, depth=self.cfg.prefetch + 2)
        gpu = self.device.type == "cuda"
        pipe = clip_pipeline(
            source=source,
            layout=self.layout,
            crop=self.cfg.crop,
            augment=self.augment if self.train else None,
            random_crop=self.train,
            dtype="fp32" if self.dtype == "fp32" else "fp16",  # DALI has no bf16: converted on the device
            gpu=gpu,
            batch_size=self.batch_size,
            num_threads=dali_threads(self.cfg.threads),
            device_id=self.device.index if gpu else None,
            seed=dali_seed,
            prefetch_queue_depth=self.cfg.prefetch,
        )
        try:
            pipe.build()
            step = 0
            while not self.train or step < self.steps_per_epoch:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    return
                yield self._to_batch(outputs)
                step += 1
        finally:
            source.close()
            del pipe

    def _to_batch(self, outputs: tuple) -> TrainBatch | EvalBatch:
        n_views = self.layout.num_views
        views = [self._to_torch(o).to(TORCH_DTYPES[self.dtype]) for o in outputs[:n_views]]
        labels = self._to_torch(outputs[n_views])
        if self.train:
            return TrainBatch(views, labels)
        return EvalBatch(views[0], labels, self._to_torch(outputs[n_views + 1]))

    def _to_torch(self, tensor_list) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        on_gpu = isinstance(dense, TensorGPU)
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device if on_gpu else "cpu")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        return out.to(self.device, non_blocking=True)
