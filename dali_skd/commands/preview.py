"""`cli.py preview`: the two views the training loader makes of a few samples, drawn into one PNG before days of
training on them, as mmaction2's `browse_dataset` does for its pipelines. A wrong crop, a swapped channel order or a
bad normalisation shows at a glance.

The samples go through the training loader's own DALI pipeline, in one batch whose clips and draws the host side's
functions made here (`source.clip_columns`, `source.augment_draws`), so each view's label is the very draw its
pixels came from. The pixels are the network's input mapped back through `--clip.norm`. `--compare-baseline` adds,
under each view, the DataLoader baseline's view of the same frames with the same draws (`torch_baseline.augment`):
where the two loaders disagree, the rows differ.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

from dali_skd.config import AugmentConfig, ClipConfig, Device, LoaderConfig, data_field, device_field
from dali_skd.data.augment import AUGMENTATIONS
from dali_skd.data.clips import clip_frames, random_starts
from dali_skd.data.loader import TrainLoader
from dali_skd.data.shards import VideoRecord
from dali_skd.data.source import INPUT_NORMS, Batch, augment_draws, clip_columns
from dali_skd.data.torch_baseline import ViewDraws, augment, decode_clip, input_norm
from dali_skd.errors import ConfigError, InputError
from dali_skd.files import check_writable
from dali_skd.runtime import Runtime, resolve_device
from dali_skd.settings import setting, settings

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt


@settings
class PreviewConfig:
    """`cli.py preview`: what the training loader feeds the network, drawn, with the augmentations it drew."""

    data: str = data_field()
    split: str = setting("train", "the split whose samples are drawn")
    samples: int = setting(4, "samples drawn: the first usable ones of the split", at_least=1)
    frames: int = setting(4, "frames drawn of each view, evenly spaced over its clip", at_least=1)
    compare_baseline: bool = setting(
        False, "also draw the DataLoader baseline's views of the same samples with the same draws, under DALI's"
    )
    out: str = setting("views.png", "the PNG to write")
    seed: int = setting(0, "seed for the clips' starts and the augmentations' draws", at_least=0)
    device: Device = device_field()
    clip: ClipConfig = setting(ClipConfig(), "clips")
    augment: AugmentConfig = setting(AugmentConfig(), "augmentations")
    loader: LoaderConfig = setting(LoaderConfig(), "data loading")


@dataclass
class PreviewSample:
    key: str
    class_name: str
    frames: list[list[int]]  # each view's frame indices in its video
    draws: list[ViewDraws]  # each view's, as applied
    views: list[np.ndarray]  # each view as DALI made it: T x crop x crop x 3 uint8 pixels
    baseline: list[np.ndarray] | None = None  # the DataLoader baseline's, for the same frames and draws


class _OneBatch(TrainLoader):
    """The training loader, fed one batch that the preview made (so its samples and draws are known)."""

    batch: Batch

    def host_batches(self, epoch: int, steps: int | None, start_step: int = 0):
        return iter([self.batch])


def preview_samples(cfg: PreviewConfig) -> list[PreviewSample]:
    """Both views of the split's first `cfg.samples` usable samples, through the training loader's pipeline."""
    loader = _OneBatch(
        cfg.data, cfg.split, clip=cfg.clip, loader=cfg.loader, batch_size=cfg.samples, num_views=2,
        augment=cfg.augment, runtime=Runtime(resolve_device(cfg.device)),
    )  # fmt: skip
    if cfg.compare_baseline and loader.layout.format != "jpeg":
        raise ConfigError(f"{cfg.data}: --compare-baseline needs jpeg shards (the baseline's), not vp9")
    rng = np.random.default_rng(cfg.seed)
    records, starts = _usable(loader, cfg.samples, rng)
    loader.batch_size = len(records)  # a split smaller than --samples: all of it
    loader.batch, _ = clip_columns(loader.layout, records, starts, loader.stats)
    loader.batch.update(augment_draws(rng, len(records), 2, cfg.augment))
    batches = loader.epoch(0)
    views = [to_pixels(v, cfg.clip.norm) for v in next(batches).views]  # per view: N x T x c x c x 3
    batches.close()
    frames = clip_frames(np.array([r.meta.frames for r in records]), starts, cfg.clip.length, cfg.clip.frame_stride)
    samples = []
    for i, record in enumerate(records):
        meta, crop = record.meta, cfg.clip.crop
        draws = [ViewDraws.from_columns(loader.batch, i, v, cfg.augment, meta.height, meta.width, crop) for v in (0, 1)]
        baseline = None
        if cfg.compare_baseline:
            norm = input_norm(cfg.clip.norm)
            baseline = [
                to_pixels(
                    augment(decode_clip(meta, record.media, frames[i, v].tolist()), draws[v], crop, norm)[None],
                    cfg.clip.norm,
                )[0]
                for v in (0, 1)
            ]
        samples.append(
            PreviewSample(record.key, meta.label_name, frames[i].tolist(), draws, [views[0][i], views[1][i]], baseline)
        )
    return samples


def _usable(loader: TrainLoader, count: int, rng: np.random.Generator) -> tuple[list[VideoRecord], np.ndarray]:
    """The split's first `count` samples whose clips at random starts can be decoded, and those starts."""
    records, starts = [], []
    for record in loader.reader.records():
        start = random_starts(
            np.array([record.meta.frames]), loader.clip.length, rng.random((1, 2)), loader.clip.frame_stride
        )
        _, ok = clip_columns(loader.layout, [record], start, loader.stats)  # checks the strips the clips need
        if ok[0]:
            records.append(record)
            starts.append(start)
        else:
            print(f"preview: {record.where}: {record.problem}; skipped", flush=True)
        if len(records) == count:
            break
    if not records:
        raise InputError(f"{loader.data}: no usable sample in the {loader.split} split")
    return records, np.concatenate(starts)


def to_pixels(views: torch.Tensor, norm: str) -> np.ndarray:
    """N x 3 x T x H x W network input -> N x T x H x W x 3 uint8 pixels, `INPUT_NORMS[norm]` undone."""
    mean, std = (torch.tensor(x).view(1, 3, 1, 1, 1) for x in INPUT_NORMS[norm])
    pixels = (views.float().cpu() * std + mean).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).numpy()


def describe(draws: ViewDraws, crop: int) -> str:
    """A view's draws, as text, in the order they were applied: `crop 112 at x 12, y 5, contrast 1.21x, hue -12°,
    blur σ 1.30, split G, flip`."""
    words = [f"crop {crop} at x {draws.left}, y {draws.top}"]
    words += [a.describe(draws.applied[name]) for name, a in AUGMENTATIONS.items() if name in draws.applied]
    return ", ".join(words)


@dataclass(frozen=True)
class Layout:
    """Where everything goes, in pixels: per sample a title line, then per view (side by side) a label and a row of
    `shown` frames (a second row, the baseline's, with --compare-baseline)."""

    samples: int
    shown: int
    rows: int  # 1, or 2 with the baseline
    size: int  # a panel's side: the crop, scaled up by a whole factor when small
    title: int = 22
    label: int = 44  # three lines: the frames, then the draws, wrapped to the view's width
    gap: int = 4
    view_gap: int = 24
    row_label: int = 0  # room left of the panels for "DALI" / "baseline"

    @property
    def view_width(self) -> int:
        return self.shown * (self.size + self.gap)

    @property
    def block(self) -> int:
        return self.title + self.label + self.rows * (self.size + self.gap) + self.gap

    @property
    def width(self) -> int:
        return self.row_label + 2 * self.view_width + self.view_gap

    @property
    def height(self) -> int:
        return self.samples * self.block

    def panel(self, sample: int, view: int, row: int, frame: int) -> tuple[int, int]:
        """(top, left) of a panel."""
        top = sample * self.block + self.title + self.label + row * (self.size + self.gap)
        return top, self.row_label + view * (self.view_width + self.view_gap) + frame * (self.size + self.gap)


def layout_for(samples: list[PreviewSample], shown: int) -> Layout:
    crop = samples[0].views[0].shape[1]
    compare = samples[0].baseline is not None
    return Layout(
        len(samples), shown, 2 if compare else 1, crop * max(1, math.ceil(96 / crop)), row_label=70 if compare else 0
    )


def shown_frames(clip_len: int, shown: int) -> list[int]:
    """Which frames of a view are drawn: `shown` of them, evenly spaced, first and last included."""
    return sorted({round(x) for x in np.linspace(0, clip_len - 1, min(shown, clip_len))})


def draw(samples: list[PreviewSample], shown: int, out: str | Path) -> Path:
    """The PNG: the panels pasted pixel for pixel (scaled by a whole factor, never resampled), text around them."""
    clip_len = samples[0].views[0].shape[0]
    which = shown_frames(clip_len, shown)
    lay = layout_for(samples, len(which))
    canvas = np.full((lay.height, lay.width, 3), 255, np.uint8)
    scale = lay.size // samples[0].views[0].shape[1]
    for s, sample in enumerate(samples):
        for v in (0, 1):
            rows = [sample.views[v]] + ([sample.baseline[v]] if sample.baseline is not None else [])
            for r, view in enumerate(rows):
                for j, t in enumerate(which):
                    top, left = lay.panel(s, v, r, j)
                    canvas[top : top + lay.size, left : left + lay.size] = view[t].repeat(scale, 0).repeat(scale, 1)
    dpi = 100
    fig = plt.figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi)
    fig.figimage(canvas, 0, 0, origin="upper")

    def text(x: int, y: int, words: str, **kw) -> None:  # y: the pixel row of the text's top
        fig.text(x / lay.width, 1 - y / lay.height, words, va="top", ha="left", **{"fontsize": 8, **kw})

    for s, sample in enumerate(samples):
        y = s * lay.block
        text(lay.row_label, y + 4, f"{sample.class_name}  ({sample.key})", fontweight="bold", fontsize=9)
        for v in (0, 1):
            _, left = lay.panel(s, v, 0, 0)
            frames = sample.frames[v]
            shown_at = ", ".join(str(frames[t]) for t in which)
            lines = [f"view {v + 1}: frames {frames[0]}..{frames[-1]}, drawn: {shown_at}"]
            lines += textwrap.wrap(describe(sample.draws[v], samples[0].views[0].shape[1]), lay.view_width // 6)[:2]
            for k, line in enumerate(lines):
                text(left, y + lay.title + 13 * k, line)
        if sample.baseline is not None:
            for r, name in enumerate(("DALI", "baseline")):
                top, _ = lay.panel(s, 0, r, 0)
                text(2, top + lay.size // 2 - 6, name)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def run_preview(cfg: PreviewConfig) -> Path:
    check_writable(Path(cfg.out).parent, "--out")
    samples = preview_samples(cfg)
    path = draw(samples, cfg.frames, cfg.out)
    print(
        f"wrote {path}: {len(samples)} samples x 2 views"
        + (", DALI above the baseline" if cfg.compare_baseline else "")
    )
    return path
