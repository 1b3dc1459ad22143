"""The GPU path (decoders `mixed`, operators on the GPU, DLPack hand-off): run only where there is a CUDA GPU."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clipdata import dali_decoded, damage_strip, default_strips, noise_frames, write_dataset

from dali_skd.commands.bench import LUMA, decode_parity
from dali_skd.config import AugmentConfig, LoaderConfig, SamplingConfig
from dali_skd.data.loader import EvalLoader, TrainLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# nvJPEG's IDCT is not libjpeg-turbo's, bit for bit; with the same chroma upsampling the two agree this closely
MAX_LEVELS, MEAN_LEVELS = 12.0, 1.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    videos = [(noise_frames(24, seed=i, height=128, width=170), i % 2) for i in range(6)]
    return write_dataset(tmp_path_factory.mktemp("gpu"), {"train": videos, "test": videos}, ["a", "b"], per_shard=3)


ON_THE_GPU = {
    "loader": LoaderConfig(threads=2),
    "sampling": SamplingConfig(shuffle_buffer=2),
    "device": torch.device("cuda"),
}


def test_gpu_and_cpu_decode_the_same_pixels(data: Path) -> None:
    """The CUDA decoder alone (hw_decoder_load 0), with the CPU's chroma upsampling, against the CPU and Pillow."""
    report = decode_parity(str(data), ["cuda", "cpu"], videos=6, clips_per_video=2, loader=LoaderConfig(threads=2))
    for pair, diff in report["pairs"].items():
        assert diff["max_abs"] <= MAX_LEVELS and diff["mean_abs"] <= MEAN_LEVELS, (pair, diff)


def test_the_hardware_decoder_within_what_jpeg_allows(data: Path) -> None:
    """The hardware engine (hw_decoder_load 1): JPEG fixes luma up to the IDCT's tolerance but leaves chroma
    upsampling to the decoder, so only luma has a bound (docs/pipeline.md); the RGB figures are printed."""
    report = decode_parity(
        str(data), ["cuda", "cpu"], videos=6, clips_per_video=2, hw_loads=(1.0,), loader=LoaderConfig(threads=2)
    )
    for pair, diff in report["pairs"].items():
        print(pair, diff)
        if "hw1" in pair:
            assert diff["luma_mean_abs"] <= MEAN_LEVELS, (pair, diff)


def test_nvjpeg_decodes_the_strips_preprocess_writes_by_default() -> None:
    """The GPU twin of test_jpeg_settings.py's CPU test: the default strips (baseline, 4:2:0, the default quality and
    Huffman tables) through the CUDA decoder (hw_decoder_load 0) and the hardware engine (1), against Pillow."""
    from PIL import Image

    strips = default_strips(noise_frames(20, seed=3, height=128, width=170))
    for load in (0.0, 1.0):
        for strip, decoded in zip(strips, dali_decoded(strips, "mixed", load), strict=True):
            pillow = np.asarray(Image.open(io.BytesIO(strip)).convert("RGB")).astype(np.float32)
            diff = np.abs(decoded.astype(np.float32) - pillow)
            luma = np.abs((decoded.astype(np.float32) - pillow) @ np.array(LUMA, np.float32))
            assert decoded.shape == pillow.shape and luma.mean() <= MEAN_LEVELS, (load, luma.mean())
            if load == 0.0:
                assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())


def test_gpu_training_batches_stay_on_the_gpu(data: Path) -> None:
    loader = TrainLoader(
        str(data), **ON_THE_GPU, batch_size=3, num_views=2, augment=AugmentConfig(), dtype="fp16", channels_last=True
    )
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            for view in batch.views:
                assert view.device.type == "cuda" and view.dtype == torch.float16
                assert view.shape == (3, 3, 16, 112, 112) and -1 <= view.min() <= view.max() <= 1
                assert view.is_contiguous(memory_format=torch.channels_last_3d)
            assert batch.labels.device.type == "cuda"
    assert loader.pipeline_builds == 1


def test_gpu_channels_last_clips_equal_todays(data: Path) -> None:
    runs = [
        list(
            TrainLoader(
                str(data), **ON_THE_GPU, batch_size=3, num_views=2, augment=AugmentConfig(), channels_last=c
            ).epoch(0)
        )
        for c in (False, True)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.labels, b.labels)
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views, strict=True))


def test_gpu_decoder_failure_is_named_and_skipped(tmp_path: Path) -> None:
    """A bogus Huffman table in a shard without checksums reaches the mixed decoder: the video is named, skipped,
    and the others come through."""
    videos = [(noise_frames(24, seed=i, height=128, width=170), i % 2) for i in range(6)]
    old = write_dataset(tmp_path / "old", {"train": videos, "test": videos}, ["a", "b"], per_shard=3, checksums=False)
    damage_strip(old, "test", "test-0000003", "huffman", strip=1)
    loader = EvalLoader(
        str(old), "test", loader=LoaderConfig(threads=2), device=torch.device("cuda"), batch_size=4, clips_per_video=2
    )
    ids = [vid for batch in loader.epoch() for vid in batch.video_ids.tolist()]
    assert sorted(set(ids) - loader.undecodable_ids()) == [0, 1, 2, 4, 5]
    assert loader.stats.skipped == 1 and "test-0000003" in loader.stats.examples[0], loader.stats.examples
    shutil.rmtree(old)
