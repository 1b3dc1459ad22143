"""The DALI loader on the CPU: real pipelines on real tiny shards."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from clipdata import frame_index, gradient_frames, noise_frames, write_dataset

from dali_skd.cli_options import build_config
from dali_skd.config import AugmentConfig, ClipConfig, ConfigError, LoaderConfig, SamplingConfig, ScoreSettings
from dali_skd.data.checks import admission_problem
from dali_skd.data.clips import clip_frames, plan_strips, spaced_starts, strip_slots
from dali_skd.data.loader import EvalBatch, EvalLoader, TrainBatch, TrainLoader
from dali_skd.data.pipeline import clip_pipeline
from dali_skd.data.shards import PartReader, SourceStats, expand_urls, rank_part, split_urls
from dali_skd.data.source import InputLayout, augment_draws, eval_batches, video_id
from dali_skd.format import FormatError, ShardManifest, sample_key
from dali_skd.runtime import Runtime, resolve_device
from preprocess.shards import ShardWriter

CPU = torch.device("cpu")
NO_AUGMENT = AugmentConfig(**{f: 0.0 for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_")})
AUGMENTATIONS = [f for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_")]


@pytest.fixture(scope="module")
def gradient_data(tmp_path_factory) -> Path:
    """Videos of 40, 23, 16, 9 and 5 frames (the last two shorter than a clip), three classes."""
    lengths = [40, 23, 16, 9, 5, 31, 12]
    videos = [(gradient_frames(n), i % 3) for i, n in enumerate(lengths)]
    root = tmp_path_factory.mktemp("gradient")
    return write_dataset(root, {"train": videos, "test": videos}, ["a", "b", "c"], per_shard=2)


@pytest.fixture(scope="module")
def noise_data(tmp_path_factory) -> Path:
    videos = [(noise_frames(12, seed=i), i % 2) for i in range(16)]
    return write_dataset(tmp_path_factory.mktemp("noise"), {"train": videos, "test": videos}, ["a", "b"], per_shard=4)


def eval_loader(data: Path | str, split: str = "test", clip: dict | None = None, **kw) -> EvalLoader:
    """An EvalLoader on the CPU with 2 threads, its clips cut as `clip` says."""
    runtime = kw.pop("runtime", Runtime(CPU))
    return EvalLoader(
        str(data), split, clip=ClipConfig(**clip or {}), loader=LoaderConfig(threads=2), runtime=runtime, **kw
    )


def train_loader(data: Path, split: str = "train", clip: dict | None = None, sampling: dict | None = None, **kw):
    """A TrainLoader on the CPU with 2 threads and a shuffle buffer of 4."""
    return TrainLoader(
        str(data), split, clip=ClipConfig(**clip or {}), loader=LoaderConfig(threads=2),
        sampling=SamplingConfig(**{"shuffle_buffer": 4, **(sampling or {})}), runtime=kw.pop("runtime", Runtime(CPU)),
        **kw,
    )  # fmt: skip


def train_batches_of(data: Path, epoch: int = 0, seed: int = 0, **kw) -> list[TrainBatch]:
    aug = kw.pop("augment", AugmentConfig())
    return list(train_loader(data, "train", augment=aug, seed=seed, **kw).epoch(epoch))


# -- clip planning (pure) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, 5])
@pytest.mark.parametrize("frames_per_jpeg", [1, 4, 8, 16])
@pytest.mark.parametrize("frames", [3, 15, 16, 17, 40, 121])
def test_strip_plan_yields_the_clip(frames: int, frames_per_jpeg: int, stride: int) -> None:
    slots = strip_slots(16, frames_per_jpeg, stride)
    span = 15 * stride + 1
    starts = np.array([s for s in range(frames) if frames < span or s <= frames - span])
    wanted = clip_frames(np.full(len(starts), frames), starts, 16, stride)
    plan = plan_strips(wanted, frames_per_jpeg, slots)  # every possible clip of the video, in one call
    assert plan.strips.shape == plan.rows.shape == (len(starts), slots)
    for clip, strips, rows, order in zip(wanted, plan.strips, plan.rows, plan.order, strict=True):
        decoded = [s * frames_per_jpeg + r for s, n in zip(strips, rows, strict=True) for r in range(n)]
        assert all(s * frames_per_jpeg + n <= frames for s, n in zip(strips, rows, strict=True))
        assert [decoded[i] for i in order] == clip.tolist()
        assert list(strips) == sorted(strips)
        assert set(strips) == {i // frames_per_jpeg for i in clip}  # no strip the clip does not need


def test_spaced_starts() -> None:
    assert spaced_starts(40, 16, 3).tolist() == [0, 12, 24]
    assert spaced_starts(10, 16, 4).tolist() == [0, 0, 0, 0]
    assert clip_frames(np.array([5]), np.array([3]), 8).tolist() == [[3, 4, 0, 1, 2, 3, 4, 0]]


# -- training batches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_train_batches_shape_dtype_range(gradient_data: Path, dtype: str) -> None:
    batches = train_batches_of(gradient_data, batch_size=3, num_views=2, runtime=Runtime(CPU, precision=dtype))
    assert len(batches) == 7 // 3
    for b in batches:
        assert len(b.views) == 2
        for v in b.views:
            assert v.shape == (3, 3, 16, 112, 112)
            assert v.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
            assert v.min() >= -1 and v.max() <= 1 and v.max() - v.min() > 0.8  # [-1, 1], not [0, 1] or [0, 255]
        assert b.labels.dtype == torch.int64 and set(b.labels.tolist()) <= {0, 1, 2}
        assert not torch.equal(b.views[0], b.views[1])


def test_clips_are_consecutive_frames_and_short_videos_loop(gradient_data: Path) -> None:
    seen_short = 0
    for epoch in range(3):
        for b in train_batches_of(gradient_data, epoch, batch_size=7, num_views=2, augment=NO_AUGMENT):
            for view in b.views:
                for clip in view.numpy():
                    idx = frame_index(clip)
                    length = len(set(idx))  # a clip of a video shorter than 16 frames holds all of them
                    if length < 16:
                        seen_short += 1
                        assert length in (5, 9, 12)
                    assert list(idx) == [(idx[0] + t) % length if length < 16 else idx[0] + t for t in range(16)]
                    assert idx.max() < 40
    assert seen_short > 0


def test_same_clip_option_gives_one_clip_two_augmentations(gradient_data: Path) -> None:
    (b,) = train_batches_of(gradient_data, batch_size=7, num_views=2, augment=NO_AUGMENT, sampling={"same_clip": True})
    for i in range(7):
        assert (frame_index(b.views[0][i].numpy()) == frame_index(b.views[1][i].numpy())).all()


def test_one_crop_window_and_one_flip_per_clip(gradient_data: Path) -> None:
    flips_only = replace(NO_AUGMENT, p_flip=0.5)
    orientations, windows = [], set()
    for epoch in range(2):
        for b in train_batches_of(gradient_data, epoch, batch_size=7, num_views=2, augment=flips_only):
            for view in (v.numpy() for v in b.views):
                for clip in view:
                    red = clip[0].mean(axis=1)  # T x W: red along x, per frame
                    # T x H; a strip's 4:2:0 chroma blends each frame's edge rows with its neighbour's: left out
                    green = clip[1].mean(axis=2)[:, 1:-1]
                    assert np.abs(red - red[0]).max() < 0.05, "frames of one clip have different windows or flips"
                    assert np.abs(green - green[0]).max() < 0.05
                    orientations.append(red[0, -1] > red[0, 0])
                    windows.add((round(float(min(red[0, 0], red[0, -1])), 1), round(float(green[0, 0]), 1)))
    assert 0.2 < np.mean(orientations) < 0.8, "the flip should mirror about half of the clips"
    assert len(windows) > 5, "crop windows should vary between clips"


# -- the augmentations, on the pipeline itself with centre crops ----------------------------------------------


@pytest.fixture(scope="module")
def noise_batches(noise_data: Path) -> tuple[InputLayout, list]:
    """Eval batches (centred windows) of the noise videos, 8 clips each, whose draws the tests replace."""
    manifest = ShardManifest.load(noise_data)
    layout = InputLayout("jpeg", 1, 8, manifest.frames_per_jpeg, with_video_id=True, splits=tuple(manifest.splits))
    stats = SourceStats()
    part = rank_part(split_urls(str(noise_data), manifest, "test"), 0, 1)
    reader = PartReader(part, stats, "jpgs", lambda record: admission_problem(record.key, record.meta, manifest))
    return layout, list(eval_batches(reader, layout, 32, 8, stats))


def run_pipeline(layout: InputLayout, batches: list, augment: AugmentConfig | None, seed: int = 1) -> np.ndarray:
    """The pipeline's clips for `batches`, with the host side's draws for `augment` (`seed`: the same windows)."""
    rng = np.random.default_rng(seed)
    layout = replace(layout, augmented=augment is not None)
    drawn = []
    for batch in batches:
        columns = {k: v for k, v in batch.items() if k not in ("value", "coin", "choice")}
        columns.update(augment_draws(rng, len(batch["label"]), 1, augment))
        drawn.append(columns)
    cycle = itertools.cycle(drawn)
    pipe = clip_pipeline(
        source=lambda: next(cycle), layout=layout, crop=32, augment=augment, dtype="fp32", gpu=False, in_flight=4,
        batch_size=32, num_threads=2, device_id=None,
    )  # fmt: skip
    pipe.build()
    return np.concatenate([np.array(pipe.run()[0].as_tensor()) for _ in batches])


def test_flip_mirrors(noise_batches) -> None:
    layout, batches = noise_batches
    plain = run_pipeline(layout, batches, NO_AUGMENT)
    flipped = run_pipeline(layout, batches, replace(NO_AUGMENT, p_flip=1.0))
    np.testing.assert_array_equal(flipped, plain[..., ::-1])


def test_channel_split_gives_three_equal_channels(noise_batches) -> None:
    layout, batches = noise_batches
    out = run_pipeline(layout, batches, replace(NO_AUGMENT, p_channel_split=1.0))
    assert (out[:, 0] == out[:, 1]).all() and (out[:, 1] == out[:, 2]).all()
    plain = run_pipeline(layout, batches, NO_AUGMENT)
    assert not (plain[:, 0] == plain[:, 1]).all()
    # the copied channel is one of the originals
    for clip, original in zip(out, plain, strict=True):
        assert any(np.array_equal(clip[0], original[c]) for c in range(3))


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_fires_about_half_the_time(noise_batches, name: str) -> None:
    layout, batches = noise_batches
    plain = run_pipeline(layout, batches, NO_AUGMENT)
    out = run_pipeline(layout, batches, replace(NO_AUGMENT, **{name: 0.5}))
    changed = np.abs(out - plain).reshape(len(out), -1).max(axis=1) > 1.5 / 127.5
    assert len(changed) == 128
    assert 0.3 < changed.mean() < 0.7, f"{name} changed {changed.mean():.0%} of the clips"


def test_augmentations_off_change_nothing(noise_batches) -> None:
    layout, batches = noise_batches
    np.testing.assert_array_equal(run_pipeline(layout, batches, NO_AUGMENT), run_pipeline(layout, batches, None))


# -- evaluation, ranks, determinism -----------------------------------------------------------------------------


def held_out_id(index: int) -> int:
    """The video id of the test split's `index`-th video in these datasets (splits train, then test)."""
    return video_id(sample_key("test", index), ("train", "test"))


def eval_ids(data: Path, rank: int = 0, world: int = 1, clips: int = 3, batch_size: int = 4) -> list[EvalBatch]:
    loader = eval_loader(data, "test", batch_size=batch_size, clips_per_video=clips, runtime=Runtime(CPU, rank, world))
    return list(loader.epoch())


def test_eval_yields_each_video_once_with_k_clips(gradient_data: Path) -> None:
    batches = eval_ids(gradient_data, clips=3, batch_size=4)
    ids = torch.cat([b.video_ids for b in batches]).tolist()
    assert sorted(ids) == sorted([held_out_id(i) for i in range(7)] * 3)
    assert [len(b.labels) for b in batches] == [4, 4, 4, 4, 4, 1]  # no padding
    lengths = [40, 23, 16, 9, 5, 31, 12]
    clips = torch.cat([b.clips for b in batches]).numpy()
    labels = torch.cat([b.labels for b in batches]).tolist()
    for vid in range(7):
        rows = [i for i, v in enumerate(ids) if v == held_out_id(vid)]
        assert [labels[i] for i in rows] == [vid % 3] * 3
        starts = [frame_index(clips[i])[0] for i in rows]
        assert starts == spaced_starts(lengths[vid], 16, 3).tolist()


@pytest.mark.parametrize("world", [2, 3, 5, 9])  # 9: more ranks than videos
def test_rank_partitions_are_disjoint_and_complete(gradient_data: Path, world: int) -> None:
    per_rank = [
        [v for b in eval_ids(gradient_data, r, world, clips=1) for v in b.video_ids.tolist()] for r in range(world)
    ]
    flat = [v for ids in per_rank for v in ids]
    # 4 shards of 2 videos: worlds 5 and 9 split samples
    assert sorted(flat) == [held_out_id(i) for i in range(7)], per_rank
    assert sum(not ids for ids in per_rank) == max(0, world - 7)


def test_train_steps_equal_on_every_rank(gradient_data: Path) -> None:
    counts = [
        len(train_batches_of(gradient_data, batch_size=2, num_views=1, runtime=Runtime(CPU, r, 3), augment=None))
        for r in range(3)
    ]
    assert counts == [1, 1, 1]


def test_same_seed_same_output(gradient_data: Path) -> None:
    a = train_batches_of(gradient_data, epoch=1, seed=5, batch_size=3, num_views=2)
    b = train_batches_of(gradient_data, epoch=1, seed=5, batch_size=3, num_views=2)
    c = train_batches_of(gradient_data, epoch=1, seed=6, batch_size=3, num_views=2)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))
        assert torch.equal(x.labels, y.labels)
    assert not all(torch.equal(x.views[0], z.views[0]) for x, z in zip(a, c, strict=True))


# -- bad input --------------------------------------------------------------------------------------------------


def _corrupt(data: Path, tmp_path: Path) -> Path:
    """A copy whose shard 0 has garbage for its first video's strips and a truncated JPEG for its second."""
    out = tmp_path / "corrupt"
    shutil.copytree(data, out)
    tar = out / "test" / "shard-000000.tar"
    raw = bytearray(tar.read_bytes())
    first = raw.find(b"\xff\xd8\xff")
    raw[first : first + 64] = b"\x00" * 64  # not a JPEG any more
    second = raw.find(b"\xff\xd8\xff", raw.find(b"test-0000001.jpgs"))
    eoi = raw.find(b"\xff\xd9", second + 100)
    raw[eoi : eoi + 2] = b"\x00\x00"  # its first strip loses its end marker: truncated
    tar.write_bytes(bytes(raw))
    return out


def test_corrupt_samples_are_skipped_and_counted(gradient_data: Path, tmp_path: Path) -> None:
    data = _corrupt(gradient_data, tmp_path)
    loader = eval_loader(data, "test", batch_size=8, clips_per_video=1)
    ids = torch.cat([b.video_ids for b in loader.epoch()]).tolist()
    assert sorted(ids) == [held_out_id(i) for i in [2, 3, 4, 5, 6]]
    assert loader.stats.skipped == 2
    # the shards hold checksums: the strips' own headers are checked too (without checksums: test_damaged.py)
    assert "test-0000000: strip 0: checksum mismatch" in loader.stats.examples[0]
    assert "test-0000001: strip 0: checksum mismatch" in loader.stats.examples[1]


def test_truncated_shard_keeps_what_precedes_the_cut(gradient_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "cut"
    shutil.copytree(gradient_data, data)
    tar = data / "test" / "shard-000001.tar"
    raw = tar.read_bytes()
    tar.write_bytes(raw[: raw.find(b"test-0000003.jpgs") + 4000])  # into the second video's strips
    loader = eval_loader(data, "test", batch_size=8, clips_per_video=1)
    ids = torch.cat([b.video_ids for b in loader.epoch()]).tolist()
    assert sorted(ids) == [held_out_id(i) for i in [0, 1, 2, 4, 5, 6]]
    assert loader.stats.skipped == 1 and "shard-000001.tar" in loader.stats.examples[0]


def test_missing_shard_and_manifest_errors(gradient_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"no manifest\.json in"):
        train_loader(tmp_path, "train", batch_size=2)
    data = tmp_path / "partial"
    shutil.copytree(gradient_data, data)
    (data / "train" / "shard-000001.tar").unlink()
    with pytest.raises(FormatError, match=r"missing, first .*shard-000001\.tar"):
        train_loader(data, "train", batch_size=2)
    with pytest.raises(FormatError, match="smaller than the 112-pixel crop"):
        write_dataset(tmp_path / "small", {"train": [(gradient_frames(4, 48, 64), 0)]}, ["a"])
        train_loader(tmp_path / "small", "train", batch_size=1)


def test_cuda_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="sees no CUDA GPU: use --device cpu"):
        resolve_device("cuda")


# -- where shards come from -------------------------------------------------------------------------------------


def test_brace_patterns_expand() -> None:
    assert expand_urls("a/shard-{000000..000002}.tar b.tar") == [
        "a/shard-000000.tar", "a/shard-000001.tar", "a/shard-000002.tar", "b.tar"
    ]  # fmt: skip


@pytest.fixture(scope="module")
def http_server(gradient_data: Path):
    """The gradient dataset served over HTTP from this process."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(gradient_data))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("scheme", ["pipe", "http"])
def test_remote_locations_stream_the_same_samples(gradient_data: Path, scheme: str, request) -> None:
    """Shards in object storage (a `pipe:` command) or behind a web server are read as streams: same batches."""
    location = f"pipe:cat {gradient_data}/{{}}" if scheme == "pipe" else request.getfixturevalue("http_server")
    local = eval_ids(gradient_data, clips=2, batch_size=5)
    remote = eval_loader(location, "test", batch_size=5, clips_per_video=2)
    for a, b in zip(local, remote.epoch(), strict=True):
        assert torch.equal(a.clips, b.clips) and torch.equal(a.video_ids, b.video_ids)


# -- both shard formats, written by the real preprocess stage ---------------------------------------------------


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory, sample_videos: dict[str, Path]) -> dict[str, Path]:
    """The same four videos (one shorter than a clip) preprocessed into jpeg and into vp9 shards."""
    from dali_skd.config import PreprocessConfig
    from preprocess.run import run_preprocess

    root = tmp_path_factory.mktemp("videos")
    for cls, kinds in {"a": ["landscape", "short"], "b": ["portrait", "other_pattern"]}.items():
        (root / cls).mkdir()
        for kind in kinds:
            shutil.copy(sample_videos[kind], root / cls / sample_videos[kind].name)
    out = {}
    for fmt in ("jpeg", "vp9"):
        out[fmt] = tmp_path_factory.mktemp(fmt)
        cfg = PreprocessConfig(dataset="folder", root=str(root), out=str(out[fmt]), format=fmt, val_fraction=0.5)
        run_preprocess(replace(cfg, workers=2), progress=False)
    return out


def test_vp9_and_jpeg_shards_give_the_same_clips(both_formats: dict[str, Path]) -> None:
    clips = {}
    for fmt, data in both_formats.items():
        batches = []
        for split in ("train", "test"):
            loader = eval_loader(data, split, batch_size=8, clips_per_video=3)
            batches += list(loader.epoch())
            assert loader.stats.skipped == 0
        clips[fmt] = torch.cat([b.clips for b in batches])
        assert clips[fmt].shape == (12, 3, 16, 112, 112)
        (train,) = train_batches_of(data, batch_size=2, num_views=2)  # the split's 2 samples
        assert all(v.shape == (2, 3, 16, 112, 112) for v in train.views)
    # two lossy codecs of the same frames: close, and closest without a shift in time
    jpeg, vp9 = clips["jpeg"], clips["vp9"]
    errors = [(jpeg[:, :, 2:14] - vp9[:, :, 2 + k : 14 + k]).abs().mean().item() for k in (-2, -1, 0, 1, 2)]
    assert errors[2] < 0.04 and errors[2] == min(errors), errors


def test_a_webm_of_another_codec_is_skipped_with_what_to_rerun(both_formats: dict[str, Path], tmp_path: Path) -> None:
    from conftest import make_test_video

    data = tmp_path / "vp8"
    shutil.copytree(both_formats["vp9"], data)
    vp8 = make_test_video(tmp_path / "vp8.webm", codec="libvpx").read_bytes()
    shard = next((data / "test").glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    writer = ShardWriter(shard)

    def as_vp8(name: str, blob: bytes) -> bytes:  # every video: VP8, its checksum recorded as a writer would
        if name.endswith(".webm"):
            return vp8
        if name.endswith(".json"):
            return json.dumps(json.loads(blob) | {"media_crc32": zlib.crc32(vp8)}).encode()
        return blob

    writer.add([(name, as_vp8(name, blob)) for name, blob in members])
    writer.finish()
    loader = eval_loader(data, "test", batch_size=4, clips_per_video=1)
    assert list(loader.epoch()) == [] and loader.stats.skipped == loader.num_videos == 2
    assert "holds V_VP8" in loader.stats.examples[0] and "preprocess --format vp9" in loader.stats.examples[0]


# -- the host side: inputs by name, one pipeline per loader ------------------------------------------------------


def test_inputs_are_keyed_by_name_and_checked(noise_batches) -> None:
    layout, batches = noise_batches
    batch = batches[0]
    assert len(layout.arrange(batch)) == len(layout.names)
    with pytest.raises(ValueError, match=r"missing \['order'\]"):
        layout.arrange({k: v for k, v in batch.items() if k != "order"})
    with pytest.raises(ValueError, match=r"unknown \['flip'\]"):
        layout.arrange({**batch, "flip": batch["label"]})
    # two columns swapped by mistake: each is refused under the name it was given, naming what was expected
    swapped = {**batch, "slots": batch["order"], "order": batch["slots"]}
    with pytest.raises(ValueError, match=r"'slots': expected int32 \(1, \d+, 6\)"):
        layout.arrange(swapped)
    with pytest.raises(ValueError, match=r"'label': expected int64"):
        layout.arrange({**batch, "label": batch["label"].astype(np.int32)})
    with pytest.raises(ValueError, match=r"'strips': expected a list of 1-D uint8 arrays"):
        layout.arrange({**batch, "strips": batch["strips"][:-1]})


def test_one_pipeline_per_loader_for_the_whole_run(gradient_data: Path) -> None:
    loader = train_loader(gradient_data, batch_size=2, num_views=2, augment=AugmentConfig())
    for epoch in range(3):
        assert len(list(loader.epoch(epoch))) == loader.steps_per_epoch
    evaluation = eval_loader(gradient_data, "test", batch_size=4, clips_per_video=2)
    for _ in range(2):
        assert sum(len(b.labels) for b in evaluation.epoch()) == 14
    assert loader.pipeline_builds == 1 and evaluation.pipeline_builds == 1


def test_an_epoch_left_early_leaves_the_next_one_untouched(gradient_data: Path) -> None:
    """The pipeline outlives epochs: what it prefetched for an epoch stopped early must not leak into the next."""
    fresh = train_batches_of(gradient_data, epoch=1, seed=3, batch_size=2, num_views=2)
    loader = train_loader(gradient_data, batch_size=2, num_views=2, augment=AugmentConfig(), seed=3)
    stream = loader.stream(0)
    next(stream)
    stream.close()  # a benchmark stops an endless epoch
    again = list(loader.epoch(1))
    assert loader.pipeline_builds == 1 and len(again) == len(fresh)
    for a, b in zip(fresh, again, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views, strict=True))
        assert torch.equal(a.labels, b.labels)


# -- temporal sampling, spatial crops, input normalisation -----------------------------------------------------


def test_frame_stride_takes_every_sth_frame(tmp_path: Path) -> None:
    videos = [(gradient_frames(40), 0), (gradient_frames(12), 1)]  # the second is shorter than a clip: it loops
    data = write_dataset(tmp_path / "d", {"train": videos * 2, "test": videos}, ["long", "short"])
    loader = train_loader(data, clip={"frame_stride": 2}, batch_size=4, num_views=2, augment=NO_AUGMENT)
    (batch,) = list(loader.epoch(0))
    for view in batch.views:
        for clip, label in zip(view.numpy(), batch.labels.tolist(), strict=True):
            idx = frame_index(clip)
            if label == 0:
                assert (np.diff(idx) == 2).all() and idx[-1] < 40, idx
            else:
                assert idx.tolist() == [(idx[0] + 2 * t) % 12 for t in range(16)], idx
    evaluation = eval_loader(data, "test", clip={"frame_stride": 2}, batch_size=8, clips_per_video=2)
    clips = torch.cat([b.clips for b in evaluation.epoch()]).numpy()
    assert [frame_index(c)[0] for c in clips[:2]] == spaced_starts(40, 16, 2, stride=2).tolist() == [0, 9]
    with pytest.raises(ConfigError, match=r"--clip\.frame-stride is 0; it must be at least 1"):  # before any loader
        build_config(ScoreSettings, {"clip__frame_stride": 0})


def test_three_spatial_crops_cover_the_long_side(gradient_data: Path) -> None:
    one = eval_loader(gradient_data, "test", batch_size=6, clips_per_video=2)
    three = eval_loader(gradient_data, "test", batch_size=6, clips_per_video=2, spatial_crops=3)
    centre = torch.cat([b.clips for b in one.epoch()]).numpy()
    batches = list(three.epoch())
    crops = torch.cat([b.clips for b in batches]).numpy()
    ids = torch.cat([b.video_ids for b in batches]).tolist()
    assert len(crops) == 3 * len(centre) == 7 * 2 * 3 and sorted(ids) == sorted([held_out_id(i) for i in range(7)] * 6)
    red = crops[:, 0].mean(axis=(1, 2, 3)).reshape(-1, 3)  # red rises from left to right
    assert (red[:, 0] < red[:, 1]).all() and (red[:, 1] < red[:, 2]).all()
    np.testing.assert_array_equal(crops[1::3], centre)  # the middle window is the centre crop
    with pytest.raises(ConfigError, match="--spatial-crops is 2; it must be 1 or 3"):
        build_config(ScoreSettings, {"spatial_crops": 2})


def test_kinetics_input_norms_are_hara_et_al_mean_and_std(gradient_data: Path) -> None:
    def clips(norm: str) -> np.ndarray:
        loader = eval_loader(gradient_data, "test", clip={"norm": norm}, batch_size=7, clips_per_video=1)
        return next(iter(loader.epoch())).clips.numpy()

    levels = (clips("paper") + 1) * 127.5
    mean = np.array([0.4345, 0.4051, 0.3775])[None, :, None, None, None]
    std = np.array([0.2768, 0.2713, 0.2737])[None, :, None, None, None]
    np.testing.assert_allclose(clips("kinetics"), (levels / 255 - mean) / std, atol=1e-4)
    activitynet = np.array([114.7748, 107.7354, 99.4750])[None, :, None, None, None]
    np.testing.assert_allclose(clips("kinetics-2018"), levels - activitynet, atol=1e-3)


EXECUTOR_THREADS_SCRIPT = """
import json, os
import numpy as np
from nvidia.dali import fn, pipeline_def

@pipeline_def
def crop():
    return fn.crop(fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2, batch=True), crop=(2, 2))

held = {}
for threads in (1, 2, 6, 8):
    before = len(os.listdir("/proc/self/task"))
    pipe = crop(batch_size=2, num_threads=threads, device_id=None)
    pipe.build()
    pipe.run()
    held[threads] = len(os.listdir("/proc/self/task")) - before
    del pipe
print(json.dumps(held))
"""


@pytest.mark.slow
def test_dali_runs_operators_on_at_most_four_threads_unless_told() -> None:
    """What `loader.dali_threads` rests on, counted in /proc on the DALI installed (2.4): a pipeline holds its pool of
    `num_threads` and its executor's threads, min(num_threads, 4) of them unless DALI_EXEC2_NUM_THREADS (read once
    per process) says how many (executor_factory.cc, MakeExec2Config)."""
    held = {}
    for told in ("", "9"):
        env = {k: v for k, v in os.environ.items() if k != "DALI_EXEC2_NUM_THREADS"}
        env.update({"DALI_EXEC2_NUM_THREADS": told} if told else {})
        done = subprocess.run([sys.executable, "-c", EXECUTOR_THREADS_SCRIPT], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        held[told] = {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
    default, nine = held[""], held["9"]
    assert default[2] - default[1] == 2  # one more pool thread, one more executor thread
    assert default[8] - default[6] == 2  # two more pool threads; the executor stays at 4
    assert all(nine[t] - default[t] == 9 - min(t, 4) for t in (1, 2, 6, 8)), (default, nine)
