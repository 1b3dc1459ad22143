"""The loader a user would write without DALI, for `cli.py bench` to compare against: a PyTorch DataLoader with
worker processes reading the same shards through webdataset, decoding the same JPEG strips with Pillow and
doing the same crop, flip and colour augmentations with torch ops, pinned memory, copy to the device.

Same output as the DALI pipeline: two N x 3 x T x crop x crop views in [-1, 1] and int64 labels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from dali_skd.config import AugmentConfig, LoaderConfig
from dali_skd.data.clips import clip_frames, random_starts
from dali_skd.data.shards import load_manifest, split_urls
from dali_skd.data.source import INPUT_NORMS
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


def augment(
    clip: torch.Tensor,
    aug: AugmentConfig | None,
    crop: int,
    rng: np.random.Generator,
    norm: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One view: random crop window, then each augmentation with its probability, one draw for the clip.
    In: T x H x W x 3 uint8; out: 3 x T x crop x crop float, (x - mean) / std with `norm` = (mean, std)."""
    _, h, w, _ = clip.shape
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    v = clip[:, y : y + crop, x : x + crop].permute(3, 0, 1, 2).float()  # C T H W, 0..255
    if aug is not None:
        if rng.random() < aug.p_contrast:
            mean = v.mean()
            v = (v - mean) * rng.uniform(*aug.contrast) + mean
        if rng.random() < aug.p_brightness:
            v = v * rng.uniform(*aug.brightness)
        if rng.random() < aug.p_hue:
            a = math.radians(rng.uniform(*aug.hue))
            rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
            v = torch.einsum("ij,jthw->ithw", _YIQ2RGB @ rot @ _RGB2YIQ, v)
        if rng.random() < aug.p_blur:
            v = gaussian_blur(v, rng.uniform(*aug.blur_sigma))
        if rng.random() < aug.p_channel_split:
            v = v[int(rng.integers(3))].expand(3, -1, -1, -1)
        if rng.random() < aug.p_flip:
            v = v.flip(-1)
    mean, std = norm
    return ((v.clamp(0, 255) - mean) / std).contiguous()


def gaussian_blur(v: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    c, t, h, w = v.shape
    rows = F.conv1d(F.pad(v.reshape(-1, 1, w), (radius, radius), mode="replicate"), k).reshape(c, t, h, w)
    cols = rows.transpose(2, 3).reshape(-1, 1, h)
    cols = F.conv1d(F.pad(cols, (radius, radius), mode="replicate"), k)
    return cols.reshape(c, t, w, h).transpose(2, 3)


class TwoViewSamples:
    """webdataset sample dicts (raw bytes; nothing is decoded by webdataset) -> (view1, view2, label)."""

    def __init__(self, cfg: LoaderConfig, aug: AugmentConfig | None, seed: int) -> None:
        self.cfg, self.aug, self.seed = cfg, aug, seed
        self.norm = tuple(torch.tensor(x).view(3, 1, 1, 1) for x in INPUT_NORMS[cfg.input_norm])

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        for sample in samples:
            meta = SampleMeta.from_json(sample["json"], sample["__key__"])
            frames = np.array([meta.frames])
            starts = random_starts(frames, self.cfg.clip_len, rng.random((1, 2)), self.cfg.frame_stride)
            views = [
                augment(decode_clip(meta, sample["jpgs"], clip.tolist()), self.aug, self.cfg.crop, rng, self.norm)
                for clip in clip_frames(frames, starts, self.cfg.clip_len, self.cfg.frame_stride)[0]
            ]
            yield views[0], views[1], meta.label


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
