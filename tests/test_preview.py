"""`cli.py preview`: the picture's panels are the loader's views, its labels the draws they were made with, and the
DataLoader baseline makes the same views from the same draws. Gradient videos (clipdata) say in their pixels where
a crop window lies and which frame a panel shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clickit import invoke
from clipdata import BLUE_BASE, BLUE_STEP, gradient_frames, write_dataset
from conftest import config_reads, unread
from PIL import Image

from dali_skd.commands.preview import PreviewConfig, describe, draw, layout_for, preview_samples, shown_frames
from dali_skd.config import AugmentConfig, ClipConfig, LoaderConfig
from dali_skd.data.torch_baseline import ViewDraws

NO_COLOUR = {"p_contrast": 0.0, "p_brightness": 0.0, "p_hue": 0.0, "p_blur": 0.0, "p_channel_split": 0.0}


@pytest.fixture(scope="module")
def gradients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    videos = [(gradient_frames(20), 0), (gradient_frames(24), 1), (gradient_frames(20), 0)]
    return write_dataset(tmp_path_factory.mktemp("preview") / "data", {"train": videos}, ["left", "right"])


def preview_config(data: Path, augment: AugmentConfig, **kw) -> PreviewConfig:
    clip, loader = ClipConfig(length=8, crop=64), LoaderConfig(threads=1)
    return PreviewConfig(data=str(data), device="cpu", samples=3, clip=clip, loader=loader, augment=augment, **kw)


def gradient_at(column: int | np.ndarray, size: int) -> np.ndarray:
    """clipdata's gradient: 40 at the first pixel, 210 at the last."""
    return 40 + 170 * np.asarray(column) / (size - 1)


@pytest.mark.slow
def test_the_panels_are_the_loaders_views_and_the_labels_their_draws(gradients: Path, tmp_path: Path) -> None:
    samples = preview_samples(preview_config(gradients, AugmentConfig(p_flip=0.5, **NO_COLOUR), compare_baseline=True))
    image = np.asarray(Image.open(draw(samples, 3, tmp_path / "views.png")).convert("RGB"))
    which = shown_frames(8, 3)
    layout = layout_for(samples, len(which))
    assert which == [0, 4, 7] and image.shape == (layout.height, layout.width, 3) and layout.size == 64 * 2
    for s, sample in enumerate(samples):
        assert sample.class_name == ["left", "right", "left"][s] and sample.key == f"train-000000{s}"
        for v in (0, 1):
            for r, view in enumerate([sample.views[v], sample.baseline[v]]):
                for j, t in enumerate(which):
                    top, left = layout.panel(s, v, r, j)
                    panel = image[top : top + layout.size, left : left + layout.size]
                    assert np.array_equal(panel, view[t].repeat(2, 0).repeat(2, 1)), (s, v, r, t)
            # what the label says is what the pixels show: the window's corner, the mirror, the frames
            draws, view = sample.draws[v], sample.views[v].astype(float)
            columns = draws.left + np.arange(64)[:: -1 if "flip" in draws.applied else 1]
            assert np.abs(view[..., 0].mean(axis=(0, 1)) - gradient_at(columns, 170)).max() < 3
            assert np.abs(view[..., 1].mean(axis=(0, 2)) - gradient_at(draws.top + np.arange(64), 128)).max() < 3
            frames = np.array(sample.frames[v])
            assert np.abs(view[..., 2].mean(axis=(1, 2)) - (BLUE_BASE + BLUE_STEP * frames)).max() < 3
            assert list(frames) == list(range(frames[0], frames[0] + 8))
    draws = [d for sample in samples for d in sample.draws]
    assert len({(d.top, d.left, "flip" in d.applied) for d in draws}) > 3  # each view its own window


@pytest.mark.slow
def test_the_baseline_makes_dalis_views_from_the_same_draws(gradients: Path) -> None:
    every = AugmentConfig(p_flip=1, p_contrast=1, p_brightness=1, p_hue=1, p_blur=1, p_channel_split=1)
    for augment, mean_bound, max_bound in ((every, 1.5, 16), (AugmentConfig(), 0.5, 4)):
        samples = preview_samples(preview_config(gradients, augment, compare_baseline=True))
        diff = np.concatenate(
            [np.abs(s.views[v].astype(int) - s.baseline[v].astype(int)).ravel() for s in samples for v in (0, 1)]
        )
        # DALI rounds to whole levels after each operator, the baseline at the end only
        assert diff.mean() < mean_bound and diff.max() <= max_bound, (diff.mean(), diff.max())


def test_the_drawn_augmentations_read_as_text() -> None:
    draws = ViewDraws(5, 12, {"flip": None, "contrast": 1.214, "hue": -12.4, "blur": 1.3, "channel_split": 1})
    assert describe(draws, 112) == "crop 112 at x 12, y 5, contrast 1.21x, hue -12°, blur σ 1.30, split G, flip"
    assert describe(ViewDraws(top=0, left=3), 64) == "crop 64 at x 3, y 0"


def test_preview_writes_the_png_and_refuses_what_it_cannot_draw(gradients: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "views.png"
    common = (
        "--data",
        str(gradients),
        "--device",
        "cpu",
        "--clip.length",
        "8",
        "--clip.crop",
        "64",
        "--loader.threads",
        "1",
    )
    with config_reads() as reads:
        result = invoke("preview", *common, "--samples", "2", "--frames", "2", "--out", str(out))
    assert unread(PreviewConfig, reads) == []  # preview offers no flag that does nothing
    assert f"wrote {out}: 2 samples x 2 views" in result.output
    assert Image.open(out).size == (2 * 2 * (128 + 4) + 24, 2 * (22 + 44 + 128 + 4 + 4))
    result = invoke("preview", *common, "--samples", "0", "--out", str(out), expect_error=True)
    assert "Error: --samples is 0; it must be at least 1" in result.output
    result = invoke("preview", "--data", str(tmp_path), "--out", str(out), expect_error=True)
    assert f"no manifest.json in {tmp_path}" in result.output
