"""The GPU path (decoders `mixed`, operators on the GPU, DLPack hand-off): run only where there is a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clipdata import noise_frames, write_dataset

from dali_skd.bench import decode_parity
from dali_skd.config import AugmentConfig, LoaderConfig
from dali_skd.data.loader import TrainLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# nvJPEG's IDCT is not libjpeg-turbo's, bit for bit; with the same chroma upsampling the two agree this closely
MAX_LEVELS, MEAN_LEVELS = 12.0, 1.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    videos = [(noise_frames(24, seed=i, height=128, width=170), i % 2) for i in range(6)]
    return write_dataset(tmp_path_factory.mktemp("gpu"), {"train": videos, "test": videos}, ["a", "b"], per_shard=3)


def test_gpu_and_cpu_decode_the_same_pixels(data: Path) -> None:
    report = decode_parity(LoaderConfig(data=str(data), threads=2), ["cuda", "cpu"], videos=6, clips_per_video=2)
    for pair, diff in report["pairs"].items():
        assert diff["max_abs"] <= MAX_LEVELS and diff["mean_abs"] <= MEAN_LEVELS, (pair, diff)


def test_gpu_training_batches_stay_on_the_gpu(data: Path) -> None:
    cfg = LoaderConfig(data=str(data), threads=2, shuffle_buffer=2, device="cuda")
    loader = TrainLoader(cfg, batch_size=3, num_views=2, augment=AugmentConfig(), dtype="fp16")
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            for view in batch.views:
                assert view.device.type == "cuda" and view.dtype == torch.float16
                assert view.shape == (3, 3, 16, 112, 112) and -1 <= view.min() <= view.max() <= 1
            assert batch.labels.device.type == "cuda"
    assert loader.pipeline_builds == 1
