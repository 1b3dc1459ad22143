"""The loaders users pick instead (`data/peers.py`) and `cli.py bench` running them beside the project's own:
real h264 files written by ffmpeg, decoded by each peer library that is installed here (CI installs PyAV)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import config_reads, ffmpeg_binary, unread
from torch.overrides import TorchFunctionMode

from dali_skd.commands.bench import (
    BenchAugmentConfig,
    BenchConfig,
    bench_augment,
    peer_videos,
    to_training_device,
    tree_cpu_seconds,
)
from dali_skd.config import AugmentConfig, ClipConfig
from dali_skd.data import peers
from dali_skd.data.peers import PEERS, PeerClips, peer_loader, peer_problem, recorded_sources
from dali_skd.format import SampleMeta, ShardInfo, ShardManifest, SplitInfo, sample_key, sample_members
from preprocess.shards import ShardWriter

FRAMES, GREY_BASE, GREY_STEP = 30, 10, 8  # frame t of a counter video is grey 10 + 8 t: its pixels say its index


def counter_video(path: Path, height: int = 48, width: int = 64, gop: int | None = None) -> Path:
    """An h264 mp4 whose frame t is a flat grey of GREY_BASE + GREY_STEP t (`gop`: a keyframe every `gop` frames
    exactly; else x264's default, one GOP here)."""
    frames = np.repeat(GREY_BASE + GREY_STEP * np.arange(FRAMES, dtype=np.uint8), height * width * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "25", "-i", "-"]
    keyframes = ["-x264-params", f"keyint={gop}:min-keyint={gop}:scenecut=0"] if gop else []
    command = [ffmpeg_binary(), "-loglevel", "error", *raw, "-c:v", "libx264", *keyframes, "-pix_fmt", "yuv420p",
               "-y", str(path)]  # fmt: skip
    subprocess.run(command, input=frames.tobytes(), check=True)
    return path


def frame_indices(view: np.ndarray) -> list[int]:
    """The source frame of each frame of a 3 x T x H x W view in [-1, 1] (paper norm)."""
    grey = (view.mean(axis=(0, 2, 3)) + 1) * 127.5
    return np.rint((grey - GREY_BASE) / GREY_STEP).astype(int).tolist()


@pytest.fixture(scope="module")
def tree_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A class-folder tree of 4 counter videos (64 x 48), and a shard dataset stored at short side 48."""
    d = tmp_path_factory.mktemp("peers")
    for i, name in enumerate(["a/0.mp4", "a/1.mp4", "b/2.mp4", "b/3.mp4"]):
        counter_video(d / "tree" / name, width=64 + 16 * i)
    videos = [(noise_frames(FRAMES, seed=i), i % 2) for i in range(4)]
    return d / "tree", write_dataset(d / "data", {"train": videos}, ["a", "b"], per_shard=2)


INSTALLED = [name for name in PEERS if peer_problem(name) is None]
CROP_FLIP = bench_augment(BenchConfig(augment=BenchAugmentConfig(policy="crop-flip")))


@pytest.mark.parametrize("peer", INSTALLED)
def test_a_peer_yields_two_views_of_consecutive_frames_like_the_loader(
    tree_and_data: tuple[Path, Path], tmp_path: Path, peer: str
) -> None:
    tree, data = tree_and_data
    videos = peer_videos(str(data), str(tree), str(tmp_path / "cache"), as_is=False, workers=2)
    assert len(videos.files) == 4 and videos.form == "h264 mp4, short side 48" and not videos.skipped
    assert all(f.path.suffix == ".mp4" and f.path.is_relative_to(tmp_path / "cache") for f in videos.files)
    cfg = ClipConfig(length=6, frame_stride=2, crop=40)
    clips = PeerClips(videos.files, peer, cfg, CROP_FLIP)
    starts = set()
    for i, video in enumerate(videos.files):
        v1, v2, label = clips[i]
        assert label == video.label == (0 if video.path.parent.name == "a" else 1)
        for view in (v1, v2):
            assert view.shape == (3, 6, 40, 40) and view.dtype.is_floating_point
            assert float(view.min()) >= -1 and float(view.max()) <= 1
            index = frame_indices(view.numpy())
            assert index == list(range(index[0], index[0] + 12, 2)), index  # every 2nd frame from a start
            starts.add(index[0])
    assert len(starts) > 2  # random starts: the views differ


@pytest.mark.skipif("pyav" not in INSTALLED, reason="PyAV is not installed")
def test_pyav_finds_every_frame_after_a_seek(tmp_path: Path) -> None:
    path = counter_video(tmp_path / "v.mp4")
    for start in (0, 1, 13, 24):
        chosen = [[start, start + 5], [FRAMES - 1]]
        clips = peers.read_pyav(path, lambda n, chosen=chosen: chosen)
        assert [frame_indices((c.permute(3, 0, 1, 2).float().numpy() / 127.5) - 1) for c in clips] == chosen


@pytest.mark.skipif("pyav" not in INSTALLED, reason="PyAV is not installed")
def test_pyav_decodes_a_shared_gop_once_and_no_gop_between_far_views(tmp_path: Path) -> None:
    """Both views in one forward pass where they share a GOP (not a pass each); a view past a later keyframe gets a
    seek of its own, so the GOPs between them are not decoded."""
    import av

    one_gop, short_gops = counter_video(tmp_path / "one.mp4"), counter_video(tmp_path / "five.mp4", gop=5)
    cases = [  # the video, the frames both views need, the most frames decoding them may take
        (one_gop, [*range(2, 8), *range(20, 26)], 26),  # 0 to 25 once (a pass per view: 26 + 8)
        (short_gops, [0, 1, 26, 27], 9),  # 0 to 5, where a keyframe shows the next view is further; then 25 to 27
        (short_gops, [3, 4, 5, 6, 7, 8, 9], 10),  # a view across a keyframe: no second seek
        (short_gops, [*range(24, 30)], 10),  # the last GOP (25 to 29) from the keyframe before it (20)
    ]
    for path, wanted, most in cases:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames, decoded = peers.pyav_decode(container, stream, stream.average_rate, wanted, path)
        assert frame_indices((torch.from_numpy(frames).permute(3, 0, 1, 2).float().numpy() / 127.5) - 1) == wanted
        assert decoded <= most, (path.name, wanted, decoded)


@pytest.mark.slow
@pytest.mark.skipif("pyav" not in INSTALLED, reason="PyAV is not installed")
def test_peer_loader_batches_from_worker_processes(tree_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    tree, data = tree_and_data
    videos = peer_videos(str(data), str(tree), str(tmp_path / "cache"), as_is=True, workers=1)
    assert videos.form == "the original files" and all(f.path.is_relative_to(tree) for f in videos.files)
    batches = iter(peer_loader(videos.files, "pyav", ClipConfig(length=4, crop=32), AugmentConfig(), 6, 1))
    for _ in range(2):  # six samples of four videos: epochs run on, every batch is full
        v1, v2, labels = next(batches)
        assert v1.shape == v2.shape == (6, 3, 4, 32, 32) and labels.shape == (6,)
    batches._shutdown_workers()


def test_peer_videos_reuse_their_copies_and_name_what_is_missing(
    tree_and_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, data = tree_and_data
    cache = tmp_path / "cache"
    first = peer_videos(str(data), str(tree), str(cache), as_is=False, workers=1)

    def no_ffmpeg(*args: object) -> None:
        raise AssertionError("transcoded again")

    monkeypatch.setattr("preprocess.transcode.transcode", no_ffmpeg)
    again = peer_videos(str(data), str(tree), str(cache), as_is=False, workers=1)
    assert again.files == first.files and again.bytes_per_video == first.bytes_per_video > 0
    with pytest.raises(FileNotFoundError, match="--videos /nowhere: not a folder"):
        peer_videos(str(data), "/nowhere", str(cache), as_is=False, workers=1)
    # the dataset's recorded sources (train/0.avi, ...) lie nowhere: neither the originals nor copies
    with pytest.raises(ValueError, match=r"no video for the peer loaders \(train/\d\.avi: missing under .*videos"):
        peer_videos(str(data), None, str(cache), as_is=False, workers=1)


def test_recorded_sources_never_leave_the_videos_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    writer = ShardWriter(root / "train" / "shard-000000.tar")
    sources = ["train/a/ok.mp4", "../../etc/passwd", "/etc/passwd", "a/../../b.mp4"]
    for i, source in enumerate(sources):
        meta = SampleMeta(0, "a", source, 1, 25.0, 8, 8, "jpeg", 8, (0, 3))
        writer.add(sample_members(sample_key("train", i), meta, b"\xff\xd8\xff"))
    infos = {"train": SplitInfo(4, 4, 4, [ShardInfo("train/shard-000000.tar", 4, writer.finish())])}
    ShardManifest("test", None, ["a"], "jpeg", 8, 8, None, 90, infos).save(root)
    kept, skipped = recorded_sources(str(root), ShardManifest.load(root))
    assert kept == [("train/a/ok.mp4", 0)]
    assert len(skipped) == 3 and all("is not a path inside the videos' folder" in s for s in skipped)


def test_tree_cpu_counts_live_and_ended_children() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass\nprint(1, flush=True)\n"
    child = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(60)"], stdout=subprocess.PIPE)
    before = tree_cpu_seconds()
    child.stdout.readline()  # it has burnt 1 s of CPU and is still alive
    alive = tree_cpu_seconds()
    child.kill()
    child.wait()
    ended = tree_cpu_seconds()
    assert alive - before >= 0.7  # the live child's CPU counts
    assert abs(ended - alive) < 0.4  # once reaped, it counts once, not twice, and is not lost


def test_a_dataloader_batch_is_copied_as_it_is_then_cast_on_the_device() -> None:
    """As DALI casts on the GPU: cast first, a pinned batch would become new unpinned tensors (a synchronous copy,
    and the cast on the main process's CPU). The meta device stands in for the GPU."""
    seen: list[tuple[str, torch.dtype | None, bool]] = []

    class Casts(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to:
                dtype = next((a for a in (*args[1:], kwargs.get("dtype")) if isinstance(a, torch.dtype)), None)
                seen.append((args[0].device.type, dtype, kwargs.get("non_blocking", False)))
            return func(*args, **kwargs)

    batch = (torch.zeros(2, 3, 4, 8, 8), torch.ones(2, 3, 4, 8, 8), torch.tensor([0, 1]))
    with Casts():
        v1, v2, labels = to_training_device(batch, torch.device("meta"), torch.float16)
    assert (v1.device.type, v1.dtype, v2.dtype, labels.dtype) == ("meta", torch.float16, torch.float16, torch.int64)
    copies, casts = seen[:3], seen[3:]
    assert copies == [("cpu", None, True)] * 3 and casts == [("meta", torch.float16, False)] * 2


def test_bench_augment_crop_flip_keeps_only_crop_and_flip() -> None:
    paper = BenchAugmentConfig(p_flip=0.3)
    crop_flip = replace(paper, policy="crop-flip")
    assert bench_augment(BenchConfig(augment=crop_flip)) == replace(
        crop_flip, p_contrast=0, p_brightness=0, p_hue=0, p_blur=0, p_channel_split=0
    )
    assert bench_augment(BenchConfig(augment=paper)) is paper


def test_a_peer_that_does_not_load_is_named_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # what Python does for a module that is not installed
    assert peer_problem("decord") == "not installed: pip install -e '.[peers]'"

    def broken(name: str) -> None:
        raise OSError("libavutil.so.59: cannot open shared object file\nmore lines")

    monkeypatch.setattr(peers.importlib, "import_module", broken)
    problem = peer_problem("torchcodec")
    assert problem.startswith("torchcodec.decoders does not load here (libavutil.so.59: cannot open shared object")
    assert "FFmpeg's shared libraries" in problem and "more lines" not in problem


@pytest.mark.slow
@pytest.mark.skipif("pyav" not in INSTALLED, reason="PyAV is not installed")
def test_bench_runs_the_peers_beside_dali_and_skips_a_missing_one(
    tree_and_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, data = tree_and_data
    monkeypatch.setitem(sys.modules, "decord", None)
    out = tmp_path / "bench.json"
    started = time.monotonic()
    with config_reads() as reads:
        result = invoke(
            "bench", "--data", str(data), "--videos", str(tree), "--cache", str(tmp_path / "cache"), "--device", "cpu",
            "--loaders", "dali,pyav,decord", "--augment.policy", "crop-flip", "--seconds", "1", "--repeats", "2",
            "--rounds", "2", "--workers", "1", "--batch-size", "4", "--clip.length", "8", "--clip.crop", "32",
            "--train.arch", "r3d10-tiny", "--train.batch-size", "2", "--json", str(out),
        )  # fmt: skip
    assert unread(BenchConfig, reads) == []  # bench offers no flag that does nothing
    report = json.loads(out.read_text())
    assert set(report["loaders"]) == {"dali", "pyav"} and report["augment"] == "crop-flip"
    assert report["skipped"] == {"decord": "not installed: pip install -e '.[peers]'"}
    assert "decord      skipped: not installed: pip install -e '.[peers]'" in result.output
    assert "random crop and flip (crop-flip); 2 rounds" in result.output
    pyav, dali = report["loaders"]["pyav"], report["loaders"]["dali"]
    assert len(pyav["rounds"]) == 2 and pyav["samples_per_s"] > 0 and pyav["cpu_us_per_sample"] > 0
    assert pyav["ratio_to_dali"] == pyav["samples_per_s"] / dali["samples_per_s"] and dali["ratio_to_dali"] == 1
    assert pyav["reads"] == "h264 mp4, short side 48" and dali["reads"] == "jpeg shards"
    sizes = [p.stat().st_size for p in (tmp_path / "cache").rglob("*.mp4")]
    assert len(sizes) == 4 and pyav["disk_bytes_per_video"] == sum(sizes) / 4
    assert dali["disk_bytes_per_video"] == sum(p.stat().st_size for p in data.rglob("*.tar")) / 4
    line = next(line for line in result.output.splitlines() if line.startswith("pyav"))
    assert f"{pyav['ratio_to_dali']:.2f}" in line and f"{pyav['cpu_us_per_sample']:.0f}" in line
    assert time.monotonic() - started < 300
