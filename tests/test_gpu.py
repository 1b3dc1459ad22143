"""The GPU path (decoders `mixed`, operators on the GPU, DLPack hand-off). Every test runs twice: on the GPU where
there is one (marked `gpu`: `pytest -m gpu` runs those alone, as the GPU check does) and, its twin, on the CPU
everywhere, with the same assertions: no test's own logic runs first on a GPU."""

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
from dali_skd.data.source import VIDEOS_PER_SPLIT
from dali_skd.runtime import Runtime


def on_the_gpu(*values: object) -> pytest.param:
    """A parameter set that needs a CUDA GPU: marked `gpu`, skipped without one."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.param(*values, marks=[pytest.mark.gpu, no_gpu])


DEVICES = [on_the_gpu("cuda"), "cpu"]

# nvJPEG's IDCT is not libjpeg-turbo's, bit for bit; with the same chroma upsampling the two agree this closely
MAX_LEVELS, MEAN_LEVELS = 12.0, 1.0
VIDEOS = [(noise_frames(24, seed=i, height=128, width=170), i % 2) for i in range(6)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("gpu"), {"train": VIDEOS, "test": VIDEOS}, ["a", "b"], per_shard=3)


def settings(device: str, precision: str = "fp32", channels_last: bool = False) -> dict:
    return {
        "loader": LoaderConfig(threads=2),
        "sampling": SamplingConfig(shuffle_buffer=2),
        "runtime": Runtime(torch.device(device), precision=precision, channels_last=channels_last),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_the_decoder_gives_pillows_pixels(data: Path, device: str) -> None:
    """The CUDA decoder alone (hw_decoder_load 0), with the CPU's chroma upsampling; the CPU decoder (its twin)."""
    report = decode_parity(str(data), [device], videos=6, clips_per_video=2, loader=LoaderConfig(threads=2))
    assert list(report["pairs"]) == [f"dali-{device}{'-hw0' if device == 'cuda' else ''} vs pillow"]
    for pair, diff in report["pairs"].items():
        assert diff["max_abs"] <= MAX_LEVELS and diff["mean_abs"] <= MEAN_LEVELS, (pair, diff)


@pytest.mark.parametrize("device", DEVICES)
def test_the_hardware_decoder_within_what_jpeg_allows(data: Path, device: str) -> None:
    """The hardware engine (hw_decoder_load 1; the CPU ignores it): JPEG fixes luma up to the IDCT's tolerance but
    leaves chroma upsampling to the decoder, so only luma has a bound (docs/pipeline.md); RGB figures printed."""
    report = decode_parity(
        str(data), [device], videos=6, clips_per_video=2, hw_loads=(1.0,), loader=LoaderConfig(threads=2)
    )
    for pair, diff in report["pairs"].items():
        print(pair, diff)
        assert diff["luma_mean_abs"] <= MEAN_LEVELS, (pair, diff)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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


@pytest.mark.parametrize("device", DEVICES)
def test_training_batches_stay_on_the_device(data: Path, device: str) -> None:
    loader = TrainLoader(
        str(data), **settings(device, "fp16", channels_last=True), batch_size=3, num_views=2, augment=AugmentConfig(),
    )  # fmt: skip
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            for view in batch.views:
                assert view.device.type == device and view.dtype == torch.float16
                assert view.shape == (3, 3, 16, 112, 112) and -1 <= view.min() <= view.max() <= 1
                assert view.is_contiguous(memory_format=torch.channels_last_3d)
            assert batch.labels.device.type == device
    assert loader.pipeline_builds == 1


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_clips_equal_todays(data: Path, device: str) -> None:
    runs = [
        list(
            TrainLoader(
                str(data), **settings(device, channels_last=c), batch_size=3, num_views=2, augment=AugmentConfig()
            ).epoch(0)
        )
        for c in (False, True)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.labels, b.labels)
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views, strict=True))


def clips_by_video(loader: EvalLoader) -> dict[int, torch.Tensor]:
    """Each test video's clips (index in the split: ids carry the split too), on the CPU, as 0-255 levels."""
    batches = list(loader.epoch())
    ids = torch.cat([b.video_ids.cpu() for b in batches]) % VIDEOS_PER_SPLIT
    clips = (torch.cat([b.clips.float().cpu() for b in batches]) + 1) * 127.5
    return {int(v): clips[ids == v] for v in ids.unique()}


@pytest.mark.parametrize(
    ("device", "hw_decoder_load"), [*(on_the_gpu("cuda", load) for load in (0.0, 0.65, 1.0)), ("cpu", 0.65)]
)
def test_a_strip_the_cpu_cannot_decode_is_named_and_skipped_never_decoded_as_garbage(
    tmp_path: Path, device: str, hw_decoder_load: float
) -> None:
    """A bogus Huffman table in a shard without checksums (written before them, or damaged before its checksum was
    written) reaches the decoder. DALI's CPU decoder fails it; nvImageCodec hands a sample that one backend fails
    to the next (hardware, CUDA, hybrid, CPU), so a GPU might deliver it as garbage, without an error: at each
    share of the hardware decoder (0: CUDA first; 1: hardware first), this says which."""
    clean = write_dataset(
        tmp_path / "clean", {"train": VIDEOS, "test": VIDEOS}, ["a", "b"], per_shard=3, checksums=False
    )
    damaged = Path(shutil.copytree(clean, tmp_path / "damaged"))
    damage_strip(damaged, "test", "test-0000003", "huffman", strip=1)
    cfg = LoaderConfig(threads=2, hw_decoder_load=hw_decoder_load)
    loaders = [EvalLoader(str(d), "test", loader=cfg, runtime=Runtime(torch.device(device)), batch_size=4,
                          clips_per_video=2) for d in (clean, damaged)]  # fmt: skip
    reference, delivered = (clips_by_video(loader) for loader in loaders)
    dropped = {vid % VIDEOS_PER_SPLIT for vid in loaders[1].undecodable_ids()}
    if 3 not in dropped:
        difference = (delivered[3] - reference[3]).abs()
        pytest.fail(
            f"the {device} decoder (hw_decoder_load {hw_decoder_load}) delivered video 3, strip 1 of which has a bogus "
            f"Huffman table, without an error: its clips differ from the undamaged video's by {difference.mean():.1f} "
            f"levels on average, {difference.max():.0f} at most"
        )
    assert sorted(set(delivered) - dropped) == [0, 1, 2, 4, 5]
    assert all(torch.equal(delivered[v], reference[v]) for v in (0, 1, 2, 4, 5))  # the others, untouched
    assert loaders[1].stats.skipped == 1 and "test-0000003" in loaders[1].stats.examples[0], loaders[1].stats.examples
