"""The loader a user would write without DALI, for `cli.py bench` to compare against: a PyTorch DataLoader with
worker processes reading the same shards through webdataset, decoding the same JPEG strips with Pillow and
doing the same augmentations with the torch operators of the table (`data/augment.py`), pinned memory, copy to the
device.

Same output as the DALI pipeline: two N x 3 x T x crop x crop views in [-1, 1] and int64 labels.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dali_skd.config import AugmentConfig, ClipConfig, SamplingConfig
from dali_skd.data.augment import AUGMENTATIONS
from dali_skd.data.clips import clip_frames, random_starts
from dali_skd.data.shards import load_manifest, split_urls
from dali_skd.data.source import INPUT_NORMS, Batch, draw_columns
from dali_skd.errors import InputError
from dali_skd.format import SampleMeta


def decode_clip(meta: SampleMeta, strips: bytes, frames: list[int]) -> torch.Tensor:
    """T x H x W x 3 uint8: the clip's frames, decoding each needed strip once."""
    g, h = meta.frames_per_jpeg, meta.height
    decoded: dict[int, np.ndarray] = {}
    out = []
    for f in frames:
        s = f // g
        if s not in decoded:
            jpeg = strips[meta.strip_offsets[s] : meta.strip_offsets[s + 1]]
            decoded[s] = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        out.append(decoded[s][(f - s * g) * h : (f - s * g + 1) * h])
    return torch.from_numpy(np.stack(out))


@dataclass(frozen=True)
class ViewDraws:
    """One view's random draws: the crop window's top-left corner in pixels and the augmentations that apply, each
    with its parameter (None for one without), in the table's order. The baseline draws its own (`draw`); the
    preview takes the DALI loader's (`from_columns`), so both sides can be drawn for the same draws."""

    top: int
    left: int
    applied: dict[str, float | int | None] = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: np.random.Generator, aug: AugmentConfig | None, height: int, width: int, crop: int) -> ViewDraws:
        """The baseline's draws, each augmentation with its probability."""
        top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
        applied: dict[str, float | int | None] = {}
        chances, ranges = (aug.chances(), aug.ranges()) if aug is not None else ({}, {})
        for a in AUGMENTATIONS.values() if aug is not None else ():
            if rng.random() >= chances[a.name]:
                continue
            if a.range:
                applied[a.name] = rng.uniform(*ranges[a.name])
            else:
                applied[a.name] = int(rng.integers(len(a.choices))) if a.choices else None
        return cls(top, left, applied)

    @classmethod
    def from_columns(
        cls, batch: Batch, row: int, view: int, aug: AugmentConfig | None, height: int, width: int, crop: int
    ) -> ViewDraws:
        """The draws the host side made for `view` of sample `row` of a training batch (`source.augment_draws`), as
        the pipeline applies them: the window at round(crop_x * (width - crop)) as `fn.crop` places it; an
        augmentation of probability 0 or 1 never or always, whatever its coin."""
        drawn = {
            kind: dict(zip(names, batch[kind][row, view].tolist(), strict=True))
            for kind, names in draw_columns(aug is not None).items()
        }
        top, left = (
            int(drawn["value"][f"crop_{a}"] * (size - crop) + 0.5) for a, size in (("y", height), ("x", width))
        )
        applied: dict[str, float | int | None] = {}
        chances = aug.chances() if aug is not None else {}
        for a in AUGMENTATIONS.values() if aug is not None else ():
            p = chances[a.name]
            if p >= 1 or (p > 0 and drawn["coin"][a.name]):
                applied[a.name] = drawn["value"][a.name] if a.range else drawn["choice"][a.name] if a.choices else None
        return cls(top, left, applied)


def augment(clip: torch.Tensor, draws: ViewDraws, crop: int, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One view, as the DALI pipeline makes it (`pipeline.augment_clip`): the crop window, then the augmentations
    that apply, in the table's order, with the table's torch operators.
    In: T x H x W x 3 uint8; out: 3 x T x crop x crop float, (x - mean) / std with `norm` = (mean, std)."""
    v = clip[:, draws.top : draws.top + crop, draws.left : draws.left + crop].permute(3, 0, 1, 2).float()  # C T H W
    for name, a in AUGMENTATIONS.items():
        if name in draws.applied:
            v = a.torch(v, draws.applied[name])
    mean, std = norm
    return ((v.clamp(0, 255) - mean) / std).contiguous()


def input_norm(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of `INPUT_NORMS[name]`, shaped to broadcast over a 3 x T x H x W view."""
    mean, std = INPUT_NORMS[name]
    return torch.tensor(mean).view(3, 1, 1, 1), torch.tensor(std).view(3, 1, 1, 1)


class TwoViews:
    """What every torch loader here does per video, the DataLoader baseline's and the peers' (`peers.py`): two
    clips of `clip.length` frames (every `frame_stride`-th) from two random starts, each cropped and augmented
    (`augment`) with its own draws. One generator per DataLoader worker, made where it is first used."""

    def __init__(self, clip: ClipConfig, aug: AugmentConfig | None, seed: int) -> None:
        self.clip, self.aug, self.seed = clip, aug, seed
        self.norm = input_norm(clip.norm)
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            info = torch.utils.data.get_worker_info()
            self._rng = np.random.default_rng([self.seed, info.id if info else 0])
        return self._rng

    def frames(self, frames: int) -> list[list[int]]:
        """Each view's frame indices in a video of `frames` frames."""
        count = np.array([frames])
        starts = random_starts(count, self.clip.length, self.rng.random((1, 2)), self.clip.frame_stride)
        return clip_frames(count, starts, self.clip.length, self.clip.frame_stride)[0].tolist()

    def __call__(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of the clips (T x H x W x 3 uint8) at `frames`' indices."""
        crop = self.clip.crop
        first, second = (
            augment(clip, ViewDraws.draw(self.rng, self.aug, clip.shape[1], clip.shape[2], crop), crop, self.norm)
            for clip in clips
        )
        return first, second


class TwoViewSamples:
    """webdataset sample dicts (raw bytes; nothing is decoded by webdataset) -> (view1, view2, label)."""

    def __init__(self, clip: ClipConfig, aug: AugmentConfig | None, seed: int) -> None:
        self.views = TwoViews(clip, aug, seed)

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for sample in samples:
            meta = SampleMeta.from_json(sample["json"], sample["__key__"])
            clips = [decode_clip(meta, sample["jpgs"], frames) for frames in self.views.frames(meta.frames)]
            yield *self.views(clips), meta.label


def dataloader_baseline(
    data: str,
    clip: ClipConfig,
    sampling: SamplingConfig,
    aug: AugmentConfig | None,
    batch_size: int,
    workers: int,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """An endless DataLoader of (view1, view2, labels) batches over the training split of `data`."""
    manifest = load_manifest(data)
    if manifest.format != "jpeg":
        raise InputError(f"{data}: the DataLoader baseline reads jpeg shards, this dataset is {manifest.format}")
    urls = split_urls(data, manifest, "train")
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None, seed=seed)  # endless, any workers
        .shuffle(sampling.shuffle_buffer)
        .compose(TwoViewSamples(clip, aug, seed))
        .batched(batch_size)
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
