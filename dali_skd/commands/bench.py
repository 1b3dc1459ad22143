"""`cli.py bench`: does the loader keep the GPU busy, and how does it compare with the loaders users would write
instead: a plain DataLoader over the same shards, and DataLoaders over video files decoded by decord, PyAV or
torchcodec (`data/peers.py`)?

All loaders run in this process tree, alternating in `--rounds`, and apply the same augmentations
(`--augment.policy crop-flip|paper`). For each: two-view samples/s (per round: the median of `repeats` windows after
warm-up; reported: the median round), its ratio to the DALI loader, frames delivered and decoded per second, the
machine's CPU use and the CPU time per sample of this process and its children (DataLoader workers included), and
the bytes on disk per video of what it reads. With `--train.arch`, training-step samples/s on synthetic data
already on the device versus on the real loader, and the fraction of step time spent waiting for data. The `host`
row is the loader's host side alone: the same code, its batches handed to a DALI pipeline that only passes them
through.

The `host` row also measures what checking each strip (checksum and header) costs: on its first use in a run (the
loader's way), on every read, and for a whole first pass. The `dali` row says how long its pipeline took to build,
its decoders and their threads, and the threads the process holds; each row counts the samples skipped as damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil
import torch

from dali_skd.config import (
    Amp,
    AugmentConfig,
    ClipConfig,
    Device,
    LoaderConfig,
    ObjectiveConfig,
    OptimConfig,
    PreprocessConfig,
    SamplingConfig,
    amp_field,
    channels_last_field,
    data_field,
    device_field,
    to_dict,
)
from dali_skd.data.checks import strip_problem
from dali_skd.data.clips import clip_frames, spaced_starts
from dali_skd.data.loader import EvalLoader, TrainLoader, dali_threads, process_threads
from dali_skd.data.peers import PEERS, PeerVideos, VideoFile, peer_loader, peer_problem, recorded_sources
from dali_skd.data.pipeline import passthrough_pipeline
from dali_skd.data.shards import is_remote, load_manifest
from dali_skd.data.source import RECORDS, BackgroundBatches, Batch
from dali_skd.data.torch_baseline import dataloader_baseline, decode_clip
from dali_skd.errors import ConfigError, InputError, MissingInput, raised_at
from dali_skd.files import write_atomic
from dali_skd.methods import MethodOutput, build_method
from dali_skd.models import build_model
from dali_skd.runtime import TORCH_DTYPES, Runtime, cpu_name, resolve_device, resolve_precision
from dali_skd.settings import setting, settings
from dali_skd.step import build_train_step
from preprocess.datasets import list_folder
from preprocess.run import find_ffmpeg, ordered_map
from preprocess.transcode import DEFAULT_QUALITY, TranscodeSettings, VideoError, transcode

LOADERS = ("host", "dali", "dataloader", *PEERS)


@settings
class BenchAugmentConfig(AugmentConfig):
    """The augmentations, and which of them every loader applies."""

    policy: Literal["crop-flip", "paper"] = setting(
        "paper",
        "what every loader applies: crop-flip (a random crop and flip per view) or paper (the paper's six "
        "augmentations, with the --augment.p-* and range flags)",
    )


@settings
class BenchTrainConfig:
    """The training steps `bench` times (the trainer's own, SKD-SRL with the paper's SGD settings)."""

    arch: str | None = setting(None, "also measure training steps of this encoder (e.g. r3d18)")
    batch_size: int = setting(32, "samples per training step", at_least=1)
    channels_last: bool = channels_last_field()


@settings
class BenchConfig:
    """`cli.py bench`."""

    data: str = data_field()
    loaders: str = setting(
        "dali,dataloader",
        "loaders to measure, comma-separated: host (the host side alone), dali, dataloader, and the loaders users "
        "pick instead, each a DataLoader over video files: decord, pyav, torchcodec (pip install -e '.[peers]')",
    )
    batch_size: int = setting(64, "two-view samples per batch", at_least=1)
    seconds: float = setting(30.0, "measuring time per loader and round, after warm-up", more_than=0)
    repeats: int = setting(5, "the measuring time is split into this many windows; the median is reported", at_least=1)
    rounds: int = setting(
        3, "rounds; in each, every loader is measured once, one after another; the median is reported", at_least=1
    )
    workers: int = setting(os.cpu_count() or 1, "DataLoader worker processes of the baseline and the peers", at_least=0)
    amp: Amp = amp_field()
    device: Device = device_field()
    json: str | None = setting(None, "also write the figures to this JSON file")
    videos: str | None = setting(
        None,
        "the peers' videos: the dataset's root, where the sources preprocess recorded lie (default DATA/videos, "
        "where the synthetic set keeps them), or a class-folder tree DIR/<class>/<video>",
    )
    videos_as_is: bool = setting(
        False, "the peers read the videos as they are, not re-encoded to the dataset's short side and frame rate"
    )
    cache: str = setting(
        "runs/bench-cache", "where the peers' re-encoded videos are kept and reused, a folder per dataset and setting"
    )
    train: BenchTrainConfig = setting(BenchTrainConfig(), "training steps")
    clip: ClipConfig = setting(ClipConfig(), "clips")
    sampling: SamplingConfig = setting(SamplingConfig(), "training samples")
    augment: BenchAugmentConfig = setting(BenchAugmentConfig(), "augmentations")
    loader: LoaderConfig = setting(LoaderConfig(), "data loading")


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far, all cores: what is neither idle nor waiting on a disk."""
    t = psutil.cpu_times()
    return t.user + t.system + sum(getattr(t, name, 0.0) for name in ("nice", "irq", "softirq", "steal"))


def tree_cpu_seconds() -> float:
    """CPU time so far of this process (all its threads) and of its descendants: the live ones (DataLoader workers
    are children only once they have exited), and the reaped ones from the kernel's children counters."""
    process = psutil.Process()
    total = sum(process.cpu_times()[:4])  # user, system and the reaped children's
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # ended meanwhile: its time is in its parent's counters
            total += sum(child.cpu_times()[:4])
    return total


@dataclass
class Rate:
    samples_per_s: float
    windows: list[float]
    cpu_cores_busy: float  # the whole machine's
    cpu_us_per_sample: float  # this process's (all its threads) and its children's (DataLoader workers)
    extra: dict[str, float] = field(default_factory=dict)


def measure(
    batches: Iterator[Any],
    batch_size: int,
    seconds: float,
    repeats: int,
    sync: Callable[[], None],
    on_start: Callable[[], None] = lambda: None,
) -> tuple[Rate, float]:
    """Samples/s over `repeats` windows of seconds/repeats each, after a warm-up of at least two batches and 10%
    of the time (`on_start` runs when the warm-up ends). Returns the rate and the measured wall time."""
    warm_end = time.perf_counter() + 0.1 * seconds
    for i, _ in enumerate(batches):
        if i >= 1 and time.perf_counter() >= warm_end:
            break
    sync()
    on_start()
    windows, total, samples = [], 0.0, 0
    cpu0, own0 = cpu_busy_seconds(), tree_cpu_seconds()
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        while True:
            next(batches)
            n += 1
            if time.perf_counter() - start >= seconds / repeats:
                break
        sync()
        elapsed = time.perf_counter() - start
        windows.append(n * batch_size / elapsed)
        total += elapsed
        samples += n * batch_size
    cpu1, own1 = cpu_busy_seconds(), tree_cpu_seconds()
    busy = (cpu1 - cpu0) / total
    return Rate(statistics.median(windows), windows, busy, (own1 - own0) / samples * 1e6), total


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def bench_augment(cfg: BenchConfig) -> AugmentConfig:
    """What every loader applies: the paper's augmentations (`cfg.augment`), or (crop-flip) only the random crop
    and flip."""
    if cfg.augment.policy == "paper":
        return cfg.augment
    return cfg.augment.crop_and_flip()


def _train_loader(
    cfg: BenchConfig, device: torch.device, precision: str, batch_size: int, channels_last: bool = False
) -> TrainLoader:
    return TrainLoader(
        cfg.data, clip=cfg.clip, loader=cfg.loader, sampling=cfg.sampling, batch_size=batch_size, num_views=2,
        augment=bench_augment(cfg), runtime=Runtime(device, precision=precision, channels_last=channels_last),
    )  # fmt: skip


def bench_host(cfg: BenchConfig, device: torch.device, precision: str) -> Rate:
    """The host side alone: reading shards, choosing clips, checking strips, drawing the augmentations and laying
    out the columns, into a DALI pipeline (on the CPU) that hands its inputs back unchanged. Then the same with every
    strip checked on every read, each for the measuring time, and the checks of a whole first pass."""
    rate = _host_rate(cfg, _train_loader(cfg, device, precision, cfg.batch_size), every_read=False)
    every = _host_rate(cfg, _train_loader(cfg, device, precision, cfg.batch_size), every_read=True)
    seconds, videos = first_pass_checks(_train_loader(cfg, device, precision, cfg.batch_size))
    rate.extra.update(
        every_read_samples_per_s=every.samples_per_s,
        every_read_cpu_us_per_sample=every.cpu_us_per_sample,
        check_every_read_us_per_sample=every.cpu_us_per_sample - rate.cpu_us_per_sample,
        first_pass_check_s=seconds,
        first_pass_check_us_per_video=seconds / max(videos, 1) * 1e6,
    )
    return rate


def _host_rate(cfg: BenchConfig, loader: TrainLoader, every_read: bool) -> Rate:
    def batches() -> Iterator[Batch]:
        for batch in loader.host_batches(0, None):
            yield batch
            if every_read:  # the next read of these videos checks their strips again
                for record in batch[RECORDS]:
                    record.checked = 0

    source = BackgroundBatches(batches, depth=cfg.loader.prefetch + 2)
    pipe = passthrough_pipeline(
        source=source, layout=loader.layout, in_flight=cfg.loader.prefetch + 2, batch_size=cfg.batch_size,
        num_threads=dali_threads(cfg.loader.threads), device_id=None, prefetch_queue_depth=cfg.loader.prefetch,
    )  # fmt: skip
    pipe.build()
    try:
        rate, _ = measure(iter(pipe.run, None), cfg.batch_size, cfg.seconds, cfg.repeats, lambda: None)
    finally:
        source.close()
    rate.extra["skipped"] = loader.stats.skipped
    return rate


def first_pass_checks(loader: TrainLoader) -> tuple[float, int]:
    """CPU seconds to check every strip of every video of the loader's part once (what a run's first pass over its
    local shards spends on checks, whatever order it reads them in), and the videos. The shards are indexed first,
    outside the time."""
    records = list(loader.reader.records())
    started = time.process_time()
    for record in records:
        for strip in range(len(record.offsets) - 1):
            strip_problem(record.meta, record.media, record.offsets, strip)
    return time.process_time() - started, len(records)


def bench_dali(cfg: BenchConfig, device: torch.device, precision: str) -> Rate:
    loader = _train_loader(cfg, device, precision, cfg.batch_size)
    threads_before, memory_before = process_threads(), device_memory_used(device)
    batches = loader.stream()
    rate, _ = measure(batches, cfg.batch_size, cfg.seconds, cfg.repeats, _sync(device))
    threads, memory = process_threads(), device_memory_used(device)
    batches.close()
    loader.close()
    # JPEG rows decoded per frame delivered: strips are decoded from their top down to the last frame needed
    overhead = loader.stats.decoded_frames / max(loader.stats.clip_frames, 1)
    rate.extra.update(
        decoded_frames_per_s=rate.samples_per_s * 2 * cfg.clip.length * overhead,
        skipped=loader.stats.skipped,
        pipeline_build_s=loader.build_seconds,
        decoders=loader.decoders,
        dali_threads=loader.num_threads,
    )
    if threads is not None and threads_before is not None:
        rate.extra.update(process_threads=threads, pipeline_threads=threads - threads_before)
    if memory is not None and memory_before is not None:
        rate.extra["device_memory_mib"] = (memory - memory_before) / 2**20
    return rate


def device_memory_used(device: torch.device) -> int | None:
    """Bytes in use on the GPU, by anyone (DALI's pools included, which PyTorch's counters do not see)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


LUMA = (0.299, 0.587, 0.114)  # JPEG's (JFIF, BT.601) Y from RGB


def decode_parity(
    data: str,
    devices: Sequence[str],
    split: str = "train",
    videos: int = 8,
    clips_per_video: int = 2,
    hw_loads: Sequence[float] = (0.0,),
    clip: ClipConfig | None = None,
    loader: LoaderConfig | None = None,
) -> dict[str, Any]:
    """The same unaugmented clips (centred windows) of the first `videos` videos of `split`, decoded by the DALI
    pipeline on each of `devices` (on "cuda", once per `hw_loads`: the share of the hardware JPEG decoder, 0 the
    CUDA decoder alone) and by Pillow (libjpeg-turbo, as the DataLoader baseline does): the largest and the mean
    absolute difference of each pair, in pixel levels (0-255), of the RGB values and of their luma."""
    clip, loader = clip or ClipConfig(), loader or LoaderConfig()
    clips: dict[str, torch.Tensor] = {}
    for device in devices:
        for load in hw_loads if device == "cuda" else (loader.hw_decoder_load,):
            reader = EvalLoader(
                data, split, clip=clip, loader=replace(loader, hw_decoder_load=load),
                runtime=Runtime(torch.device(device)),
                batch_size=videos * clips_per_video, clips_per_video=clips_per_video,
            )  # fmt: skip
            batches = reader.epoch()
            name = f"dali-{device}" + (f"-hw{load:g}" if device == "cuda" else "")
            clips[name] = (next(batches).clips.float().cpu() + 1) * 127.5
            batches.close()
    records = list(itertools.islice(reader.reader.records(), videos))
    reference = []
    crop = clip.crop
    for record in records:
        starts = spaced_starts(record.meta.frames, clip.length, clips_per_video)
        for frames in clip_frames(np.array([record.meta.frames]), starts[None], clip.length)[0]:
            pixels = decode_clip(record.meta, record.media, frames.tolist())  # T x H x W x 3
            top, left = (pixels.shape[1] - crop) // 2, (pixels.shape[2] - crop) // 2
            reference.append(pixels[:, top : top + crop, left : left + crop].permute(3, 0, 1, 2).float())
    clips["pillow"] = torch.stack(reference)
    names = list(clips)
    report: dict[str, Any] = {"clips": len(reference), "videos": len(records), "pairs": {}}
    luma = torch.tensor(LUMA).view(1, 3, 1, 1, 1)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = clips[a] - clips[b]
            y = (diff * luma).sum(dim=1).abs()
            report["pairs"][f"{a} vs {b}"] = {
                "max_abs": float(diff.abs().max()),
                "mean_abs": float(diff.abs().mean()),
                "luma_max_abs": float(y.max()),
                "luma_mean_abs": float(y.mean()),
            }
    return report


def bench_dataloader(cfg: BenchConfig, device: torch.device, precision: str) -> Rate:
    baseline = dataloader_baseline(cfg.data, cfg.clip, cfg.sampling, bench_augment(cfg), cfg.batch_size, cfg.workers)
    return _dataloader_rate(baseline, cfg, device, precision)


# -- the peers' videos ---------------------------------------------------------------------------------------


def peer_videos(data: str, videos: str | None, cache: str, as_is: bool, workers: int) -> PeerVideos:
    """The training videos for the peers: the sources preprocess recorded in DATA's training shards, found under
    `videos` (default DATA/videos, where the synthetic set keeps them), or, when `videos` does not hold them, the
    class-folder tree `videos` (`DIR/<class>/<video>`). Unless `as_is`, each is read re-encoded to the dataset's
    short side and frame rate as h264 mp4 (`preprocess`'s transcode), kept under `cache` in a folder per dataset
    and setting, so that a second run, or a machine without ffmpeg or the originals, reads the same files."""
    manifest = load_manifest(data)
    root = Path(videos) if videos else None if is_remote(data) else Path(data) / "videos"
    if videos and not root.is_dir():
        raise MissingInput(f"--videos {videos}: not a folder; give the folder of the dataset's videos")
    recorded, skipped = recorded_sources(data, manifest)
    if root is not None and videos and not any((root / source).is_file() for source, _ in recorded[:50]):
        listing = list_folder(PreprocessConfig(dataset="folder", val_fraction=0.0), root)
        sources = [(v.source, v.label) for v in listing.splits["train"]]
        where = f"folder-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]}"
    else:
        sources = recorded
        dataset = json.dumps(manifest.to_dict(), sort_keys=True).encode()
        where = f"dataset-{hashlib.sha1(dataset).hexdigest()[:12]}"
    if as_is:
        if root is None:
            raise ConfigError(f"{data} is not local: pass --videos with the folder of its videos")
        files = [VideoFile(root / source, label) for source, label in sources if (root / source).is_file()]
        skipped += [f"{source}: missing under {root}" for source, label in sources if not (root / source).is_file()]
        form = "the original files"
    else:
        settings_name = f"h264-s{manifest.short_side}-fps{manifest.fps or 'source'}-crf{DEFAULT_QUALITY['h264']}"
        folder = Path(cache) / where / settings_name
        files, failed = fair_copies(sources, root, folder, manifest.short_side, manifest.fps, workers)
        skipped += failed
        form = f"h264 mp4, short side {manifest.short_side}{f', {manifest.fps:g} fps' if manifest.fps else ''}"
    if not files:
        raise InputError(
            f"no video for the peer loaders ({skipped[0] if skipped else 'the training split is empty'}): pass "
            "--videos with the folder of the dataset's videos, or a class-folder tree"
        )
    if skipped:
        print(f"peers: {len(skipped)} videos left out, e.g. {skipped[0]}", flush=True)
    size = sum(f.path.stat().st_size for f in files) / len(files)
    return PeerVideos(files, form, size, skipped)


def fair_copies(
    sources: list[tuple[str, int]], root: Path | None, folder: Path, short_side: int, fps: float | None, workers: int
) -> tuple[list[VideoFile], list[str]]:
    """`folder/<source>.mp4` for each source, transcoded from `root/<source>` the first time (atomically: an
    interrupted run leaves no half file); and why any is missing."""

    def target(source: str) -> Path:
        return folder / f"{source}.mp4"

    todo = [(s, label) for s, label in sources if not target(s).is_file()]
    failed: list[str] = []
    if todo:  # only then ffmpeg: a machine without it (the GPU check's) reads copies made elsewhere
        print(f"peers: re-encoding {len(todo)} videos into {folder} (once; later runs reuse them) ...", flush=True)
        settings = TranscodeSettings(find_ffmpeg(None), "h264", short_side, fps, DEFAULT_QUALITY["h264"], 0)

        def encode(item: tuple[str, int]) -> str | None:
            source = item[0]
            original = root / source if root is not None else None
            if original is None or not original.is_file():
                return f"{source}: missing{f' under {root}' if root is not None else ''}, and not in {folder}"
            try:
                write_atomic(target(source), transcode(original, settings).media)
            except VideoError as e:
                return f"{source}: {e}"
            return None

        failed = [why for why in ordered_map(encode, todo, workers) if why is not None]
    files = [VideoFile(target(s), label) for s, label in sources if target(s).is_file()]
    return files, failed


def bench_peer(name: str, videos: PeerVideos, cfg: BenchConfig, device: torch.device, precision: str) -> Rate:
    loader = peer_loader(videos.files, name, cfg.clip, bench_augment(cfg), cfg.batch_size, cfg.workers)
    return _dataloader_rate(loader, cfg, device, precision)


def to_training_device(
    batch: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DataLoader's (view1, view2, labels) as a training loop takes them: copied as they are (from pinned memory,
    without blocking), then cast on the device, as DALI casts on the GPU. Cast first, they would be new unpinned
    tensors, copied synchronously, and the cast would cost the main process CPU time the workers need."""
    v1, v2, labels = (t.to(device, non_blocking=True) for t in batch)
    return v1.to(dtype), v2.to(dtype), labels


def _dataloader_rate(
    loader: torch.utils.data.DataLoader, cfg: BenchConfig, device: torch.device, precision: str
) -> Rate:
    """A DataLoader's batches, copied to the device and cast as a training loop would; its workers end with the
    measurement, so that none holds a core or memory in the next loader's turn."""
    dtype = TORCH_DTYPES[precision]
    batches = iter(loader)

    def to_device() -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in batches:
            yield to_training_device(batch, device, dtype)

    try:
        rate, _ = measure(to_device(), cfg.batch_size, cfg.seconds, cfg.repeats, _sync(device))
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own teardown, else run when collected
        if shutdown is not None:
            shutdown()
    return rate


def bench_train(cfg: BenchConfig, device: torch.device, precision: str) -> dict[str, float]:
    """The trainer's step (`step.TrainStep`) with the paper's SKD-SRL and SGD settings: on one synthetic batch
    already on the device, then fed by the DALI loader."""
    num_classes = load_manifest(cfg.data, cfg.loader.read_timeout).num_classes
    method = build_method("skd-srl", build_model(cfg.train.arch, num_classes), num_classes, ObjectiveConfig())
    step = build_train_step(method, OptimConfig(), precision, device, channels_last=cfg.train.channels_last)
    b, crop = cfg.train.batch_size, cfg.clip.crop
    dtype = TORCH_DTYPES[precision]
    views = [torch.rand(b, 3, cfg.clip.length, crop, crop, device=device, dtype=dtype) * 2 - 1 for _ in range(2)]
    labels = torch.randint(0, num_classes, (b,), device=device)

    def synthetic() -> Iterator[MethodOutput]:
        while True:
            yield step(views, labels)

    half = cfg.seconds / 2
    synthetic_rate, _ = measure(synthetic(), b, half, cfg.repeats, _sync(device))

    loader = _train_loader(cfg, device, precision, b, channels_last=step.channels_last)
    waited = [0.0]

    def real() -> Iterator[MethodOutput]:
        batches = loader.stream()
        while True:
            before = time.perf_counter()
            batch = next(batches)
            waited[0] += time.perf_counter() - before
            yield step(batch.views, batch.labels)

    real_rate, seconds = measure(real(), b, half, cfg.repeats, _sync(device), lambda: waited.__setitem__(0, 0.0))
    return {
        "arch": cfg.train.arch,
        "batch_size": b,
        "precision": precision,
        "channels_last": step.channels_last,
        "synthetic_samples_per_s": synthetic_rate.samples_per_s,
        "loader_samples_per_s": real_rate.samples_per_s,
        "loader_over_synthetic": real_rate.samples_per_s / synthetic_rate.samples_per_s,
        "data_wait": waited[0] / seconds,
    }


def run_bench(cfg: BenchConfig, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every loader of `cfg.loaders`, once per round, then the training steps; prints the table and returns its
    figures (`on_round` gets them after each round). A peer that is not installed, does not load or fails while
    it runs is skipped, with the reason, and the others go on."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.amp, device)
    names = [n.strip() for n in cfg.loaders.split(",") if n.strip()]
    unknown = set(names) - set(LOADERS)
    if unknown:
        raise ConfigError(f"unknown loader(s) {', '.join(sorted(unknown))}; known: {', '.join(LOADERS)}")
    manifest = load_manifest(cfg.data, cfg.loader.read_timeout)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_cores": os.cpu_count(),
        "data": cfg.data,
        "format": manifest.format,
        "frames_per_jpeg": manifest.frames_per_jpeg,
        "quality": manifest.quality,
        "optimize_huffman": manifest.optimize_huffman,
        "precision": precision,
        "augment": cfg.augment.policy,
        "rounds": cfg.rounds,
        "date": time.strftime("%Y-%m-%d"),
        "loaders": {},
        "skipped": {},
    }
    for name in names:
        if name in PEERS and (problem := peer_problem(name)):
            report["skipped"][name] = problem
    running = [n for n in names if n not in report["skipped"]]
    shards = manifest.split("train", cfg.data)
    reads = {
        n: (f"{manifest.format} shards", sum(s.bytes for s in shards.shards) / max(shards.samples, 1)) for n in running
    }
    videos = None
    if any(n in PEERS for n in running):
        videos = peer_videos(cfg.data, cfg.videos, cfg.cache, cfg.videos_as_is, cfg.workers)
        reads.update({n: (videos.form, videos.bytes_per_video) for n in running if n in PEERS})
        report["videos"] = {"files": len(videos.files), "form": videos.form, "left_out": videos.skipped[:20]}
    benches = {"host": bench_host, "dali": bench_dali, "dataloader": bench_dataloader}
    rates: dict[str, list[Rate]] = {n: [] for n in running}
    for round_number in range(1, cfg.rounds + 1):
        for name in list(running):
            print(f"round {round_number}/{cfg.rounds}: measuring {name} for {cfg.seconds:g} s ...", flush=True)
            if name not in PEERS:
                rates[name].append(benches[name](cfg, device, precision))
                continue
            try:
                rates[name].append(bench_peer(name, videos, cfg, device, precision))
            except Exception as e:  # a peer library failing is its row's end, not the benchmark's
                said = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
                report["skipped"][name] = f"failed: {type(e).__name__} at {raised_at(e)}" + f": {said}" * bool(said)
                running.remove(name)
                del rates[name]
        loaders = report["loaders"] = {name: _summary(rates[name], reads[name], cfg) for name in running}
        if "dali" in loaders:
            for figures in loaders.values():
                figures["ratio_to_dali"] = figures["samples_per_s"] / loaders["dali"]["samples_per_s"]
        if on_round is not None:
            on_round(report)
    loaders = report["loaders"]
    if {"dali", "dataloader"} <= set(loaders):
        report["ratio_dali_over_dataloader"] = loaders["dali"]["samples_per_s"] / loaders["dataloader"]["samples_per_s"]
    if cfg.train.arch:
        print(f"measuring {cfg.train.arch} training steps for {cfg.seconds:.0f} s ...", flush=True)
        report["train"] = bench_train(cfg, device, precision)
    report["config"] = to_dict(cfg)
    print(format_report(report))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _summary(rates: list[Rate], reads: tuple[str, float], cfg: BenchConfig) -> dict[str, Any]:
    """One loader's figures: the median round's, each round's rate, and what it reads."""
    median = statistics.median
    samples_per_s = median(r.samples_per_s for r in rates)
    return {
        "samples_per_s": samples_per_s,
        "rounds": [r.samples_per_s for r in rates],
        "frames_per_s": samples_per_s * 2 * cfg.clip.length,
        "cpu_cores_busy": median(r.cpu_cores_busy for r in rates),
        "cpu_us_per_sample": median(r.cpu_us_per_sample for r in rates),
        "windows": [w for r in rates for w in r.windows],
        **{key: median(r.extra[key] for r in rates) for key in rates[0].extra},
        "reads": reads[0],
        "disk_bytes_per_video": reads[1],
    }


def format_report(report: dict[str, Any]) -> str:
    augment = {"crop-flip": "random crop and flip", "paper": "the paper's six augmentations"}[report["augment"]]
    lines = [
        f"device {report['device']}, {report['cpu_cores']} CPU cores, {report['format']} shards, {report['precision']}",
        f"every loader: two views, {augment} ({report['augment']}); {report['rounds']} round"
        f"{'s' if report['rounds'] > 1 else ''}, loaders alternating",
        f"{'loader':<12}{'samples/s':>10}  {'per round':<22}{'x dali':>7}{'CPU cores':>10}{'CPU us/sample':>14}"
        f"{'disk/video':>12}  reads",
    ]
    for name, r in report["loaders"].items():
        rounds = " ".join(f"{x:.1f}" for x in r["rounds"])
        ratio = f"{r['ratio_to_dali']:>7.2f}" if "ratio_to_dali" in r else f"{'':>7}"
        cpu = f"{r['cpu_cores_busy']:>10.1f}"
        disk = f"{r['disk_bytes_per_video'] / 1e3:>9.0f} kB"
        lines.append(
            f"{name:<12}{r['samples_per_s']:>10.1f}  {rounds:<22}{ratio}{cpu}{r['cpu_us_per_sample']:>14.0f}{disk}"
            f"  {r['reads']}"
        )
    for name, why in report["skipped"].items():
        lines.append(f"{name:<12}skipped: {why}")
    if "decoded_frames_per_s" in report["loaders"].get("dali", {}):
        r = report["loaders"]["dali"]
        lines.append(f"dali decodes {r['decoded_frames_per_s']:.0f} frames/s for {r['frames_per_s']:.0f} delivered")
    for name, r in report["loaders"].items():
        if r.get("skipped"):
            lines.append(f"{name}: {r['skipped']} damaged or unreadable samples skipped (named in the log)")
        if "check_every_read_us_per_sample" in r:
            lines.append(
                f"strip checks (checksum, header): on first use in a run (the loader's way) included above; on every "
                f"read {r['every_read_cpu_us_per_sample']:.0f} us/sample ({r['check_every_read_us_per_sample']:+.0f}); "
                f"a first pass over the part {r['first_pass_check_s'] * 1e3:.0f} ms "
                f"({r['first_pass_check_us_per_video']:.0f} us/video)"
            )
        if "pipeline_build_s" in r:
            threads = f", the process {r['process_threads']} threads" if "process_threads" in r else ""
            threads += f", {r['device_memory_mib']:.0f} MiB of GPU memory" if "device_memory_mib" in r else ""
            lines.append(
                f"{name} pipeline: {r['decoders']} decoders, {r['dali_threads']} DALI threads, built in "
                f"{r['pipeline_build_s']:.1f} s{threads}"
            )
    if "ratio_dali_over_dataloader" in report:
        lines.append(f"dali / dataloader: {report['ratio_dali_over_dataloader']:.2f}x")
    if "train" in report:
        t = report["train"]
        lines.append(
            f"training {t['arch']} (batch {t['batch_size']}, {t['precision']}): "
            f"{t['synthetic_samples_per_s']:.1f} samples/s on synthetic data, {t['loader_samples_per_s']:.1f} with "
            f"the loader ({t['loader_over_synthetic']:.0%}), waiting for data {t['data_wait']:.0%} of the time"
        )
    return "\n".join(lines)
