"""The loader a user would write without DALI, for `cli.py bench` to compare against: a PyTorch DataLoader with
worker processes reading the same shards through webdataset, decoding the same JPEG strips with Pillow and
doing the same crop, flip and colour augmentations with torch ops, pinned memory, copy to the device.

Same output as the DALI pipeline: two N x 3 x T x crop x crop views in [-1, 1] and int64 labels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from dali_skd.config import AugmentConfig, LoaderConfig
from dali_skd.data.clips import clip_frames, random_starts
from dali_skd.data.shards import load_manifest, split_urls
from dali_skd.data.source import COINS, INPUT_NORMS, VALUES, Batch
from dali_skd.format import SampleMeta

# RGB <-> YIQ: a hue rotation is a rotation of the I/Q plane (what DALI's hue operator does)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


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
    """One view's random draws: the crop window's top-left corner in pixels and, for each augmentation, its
    factor, or None when it does not apply. The baseline draws its own (`draw`); the preview takes the DALI
    loader's (`from_columns`), so both sides can be drawn for the same draws."""

    top: int
    left: int
    contrast: float | None = None
    brightness: float | None = None
    hue: float | None = None  # degrees
    blur_sigma: float | None = None
    channel: int | None = None  # the channel a split copies into all three
    flip: bool = False

    @classmethod
    def draw(cls, rng: np.random.Generator, aug: AugmentConfig | None, height: int, width: int, crop: int) -> ViewDraws:
        """The baseline's draws, each augmentation with its probability."""
        top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
        if aug is None:
            return cls(top, left)

        def maybe(p: float, value: Callable[[], float]) -> float | None:
            return value() if rng.random() < p else None

        return cls(
            top,
            left,
            contrast=maybe(aug.p_contrast, lambda: rng.uniform(*aug.contrast)),
            brightness=maybe(aug.p_brightness, lambda: rng.uniform(*aug.brightness)),
            hue=maybe(aug.p_hue, lambda: rng.uniform(*aug.hue)),
            blur_sigma=maybe(aug.p_blur, lambda: rng.uniform(*aug.blur_sigma)),
            channel=None if rng.random() >= aug.p_channel_split else int(rng.integers(3)),
            flip=bool(rng.random() < aug.p_flip),
        )

    @classmethod
    def from_columns(
        cls, batch: Batch, row: int, view: int, aug: AugmentConfig | None, height: int, width: int, crop: int
    ) -> ViewDraws:
        """The draws the host side made for `view` of sample `row` of a training batch (`source.augment_draws`), as
        the pipeline applies them: the window at round(crop_x * (width - crop)) as `fn.crop` places it; an
        augmentation of probability 0 or 1 never or always, whatever its coin."""
        value = dict(zip(VALUES, batch["value"][row, view].tolist(), strict=True))
        top, left = (int(value[f"crop_{a}"] * (size - crop) + 0.5) for a, size in (("y", height), ("x", width)))
        if aug is None:
            return cls(top, left)
        coin = dict(zip(COINS, batch["coin"][row, view].tolist(), strict=True))
        flip, channel = batch["choice"][row, view].tolist()

        def applies(p: float, name: str) -> bool:
            return p >= 1 or (p > 0 and coin[name])

        return cls(
            top,
            left,
            contrast=value["contrast"] if applies(aug.p_contrast, "contrast") else None,
            brightness=value["brightness"] if applies(aug.p_brightness, "brightness") else None,
            hue=value["hue"] if applies(aug.p_hue, "hue") else None,
            blur_sigma=value["blur_sigma"] if applies(aug.p_blur, "blur") else None,
            channel=channel if applies(aug.p_channel_split, "split") else None,
            flip=aug.p_flip > 0 and bool(flip),
        )


def augment(clip: torch.Tensor, draws: ViewDraws, crop: int, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One view, as the DALI pipeline makes it (`pipeline.augment_clip`): the crop window, then contrast (about
    the grey level 128, DALI's centre), brightness, hue, blur, channel split and flip, in that order.
    In: T x H x W x 3 uint8; out: 3 x T x crop x crop float, (x - mean) / std with `norm` = (mean, std)."""
    v = clip[:, draws.top : draws.top + crop, draws.left : draws.left + crop].permute(3, 0, 1, 2).float()  # C T H W
    if draws.contrast is not None:
        v = (v - 128) * draws.contrast + 128
    if draws.brightness is not None:
        v = v * draws.brightness
    if draws.hue is not None:
        a = math.radians(draws.hue)
        rot = torch.tensor([[1, 0, 0], [0, math.cos(a), math.sin(a)], [0, -math.sin(a), math.cos(a)]])  # DALI's sense
        v = torch.einsum("ij,jthw->ithw", _YIQ2RGB @ rot @ _RGB2YIQ, v)
    if draws.blur_sigma is not None:
        v = gaussian_blur(v, draws.blur_sigma)
    if draws.channel is not None:
        v = v[draws.channel].expand(3, -1, -1, -1)
    if draws.flip:
        v = v.flip(-1)
    mean, std = norm
    return ((v.clamp(0, 255) - mean) / std).contiguous()


def gaussian_blur(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """DALI's `gaussian_blur`: a window of 2 ceil(3 sigma) + 1, borders mirrored without repeating the edge."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    c, t, h, w = v.shape
    rows = F.conv1d(F.pad(v.reshape(-1, 1, w), (radius, radius), mode="reflect"), k).reshape(c, t, h, w)
    cols = rows.transpose(2, 3).reshape(-1, 1, h)
    cols = F.conv1d(F.pad(cols, (radius, radius), mode="reflect"), k)
    return cols.reshape(c, t, w, h).transpose(2, 3)


def input_norm(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of `INPUT_NORMS[name]`, shaped to broadcast over a 3 x T x H x W view."""
    mean, std = INPUT_NORMS[name]
    return torch.tensor(mean).view(3, 1, 1, 1), torch.tensor(std).view(3, 1, 1, 1)


class TwoViews:
    """What every torch loader here does per video, the DataLoader baseline's and the peers' (`peers.py`): two
    clips of `clip_len` frames (every `frame_stride`-th) from two random starts, each cropped and augmented
    (`augment`) with its own draws. One generator per DataLoader worker, made where it is first used."""

    def __init__(self, cfg: LoaderConfig, aug: AugmentConfig | None, seed: int) -> None:
        self.cfg, self.aug, self.seed = cfg, aug, seed
        self.norm = input_norm(cfg.input_norm)
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
        starts = random_starts(count, self.cfg.clip_len, self.rng.random((1, 2)), self.cfg.frame_stride)
        return clip_frames(count, starts, self.cfg.clip_len, self.cfg.frame_stride)[0].tolist()

    def __call__(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of the clips (T x H x W x 3 uint8) at `frames`' indices."""
        crop = self.cfg.crop
        first, second = (
            augment(clip, ViewDraws.draw(self.rng, self.aug, clip.shape[1], clip.shape[2], crop), crop, self.norm)
            for clip in clips
        )
        return first, second


class TwoViewSamples:
    """webdataset sample dicts (raw bytes; nothing is decoded by webdataset) -> (view1, view2, label)."""

    def __init__(self, cfg: LoaderConfig, aug: AugmentConfig | None, seed: int) -> None:
        self.views = TwoViews(cfg, aug, seed)

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for sample in samples:
            meta = SampleMeta.from_json(sample["json"], sample["__key__"])
            clips = [decode_clip(meta, sample["jpgs"], frames) for frames in self.views.frames(meta.frames)]
            yield *self.views(clips), meta.label


def dataloader_baseline(
    cfg: LoaderConfig, aug: AugmentConfig | None, batch_size: int, workers: int, seed: int = 0
) -> torch.utils.data.DataLoader:
    """An endless DataLoader of (view1, view2, labels) batches over the training split."""
    manifest = load_manifest(cfg.data, cfg.read_timeout)
    if manifest.format != "jpeg":
        raise ValueError(f"{cfg.data}: the DataLoader baseline reads jpeg shards, this dataset is {manifest.format}")
    urls = split_urls(cfg.data, manifest, "train")
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None, seed=seed)  # endless, any workers
        .shuffle(cfg.shuffle_buffer)
        .compose(TwoViewSamples(cfg, aug, seed))
        .batched(batch_size)
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
