"""The loaders a user would pick instead of dali-skd, for `cli.py bench`: a plain torch DataLoader over video
files, decoded by decord, PyAV or torchcodec, each called the way its users call it (decord as mmaction2's
`DecordDecode` does, PyAV seeking to the keyframe before a clip, torchcodec as its examples do), one decoding thread
per worker and the workers filling the cores.

Each produces what the project's loader produces: two views of `--clip.length` frames (every `--clip.frame-stride`-th)
from two random starts, each with its own crop window, flip and, with `--augment.policy paper`, the paper's other
augmentations, values normalised by `--clip.norm`, N x 3 x T x crop x crop float. The augmentations are the
DataLoader baseline's torch implementation (`torch_baseline.TwoViews`), which applies DALI's operators as DALI
does: torchvision.transforms.v2 would be the usual choice, but PyPI's torchvision does not import beside the CPU
build of torch the project pins ('operator torchvision::nms does not exist').

The peers are an optional extra (`pip install -e '.[peers]'`); one that is missing, or whose library does not load
here, is skipped with the reason (`peer_problem`). The videos they read are made by `cli.py bench`
(`commands/bench.py: peer_videos`), with `preprocess`'s transcoding.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from dali_skd.config import AugmentConfig, ClipConfig
from dali_skd.data.shards import PartReader, SourceStats, rank_part, split_urls
from dali_skd.data.torch_baseline import TwoViews
from dali_skd.format import STRIPS_EXT, VIDEO_EXT, ShardManifest

INSTALL = "pip install -e '.[peers]'"

# each view's frame indices, from the video's frame count
ChooseFrames = Callable[[int], list[list[int]]]


@dataclass(frozen=True)
class VideoFile:
    path: Path
    label: int


@dataclass
class PeerVideos:
    """The files the peers read, what form they are in, and what they cost on disk."""

    files: list[VideoFile]
    form: str  # e.g. "h264 mp4, short side 128, re-encoded"
    bytes_per_video: float
    skipped: list[str]  # `source: why`, of the videos left out


def recorded_sources(data: str, manifest: ShardManifest) -> tuple[list[tuple[str, int]], list[str]]:
    """(source, label) of each video of the training split, as preprocess recorded them, and why any was left out:
    a source is a relative path that stays inside the videos' folder, or it is not read."""
    part = rank_part(split_urls(data, manifest, "train"), 0, 1)
    reader = PartReader(part, SourceStats(), STRIPS_EXT if manifest.format == "jpeg" else VIDEO_EXT, lambda meta: None)
    sources, skipped = [], []
    for record in reader.records():
        path = PurePosixPath(record.meta.source)
        if not record.meta.source or path.is_absolute() or ".." in path.parts:
            skipped.append(f"{record.where}: source {record.meta.source!r} is not a path inside the videos' folder")
        else:
            sources.append((record.meta.source, record.meta.label))
    return sources, skipped


def read_decord(path: Path, choose: ChooseFrames) -> list[torch.Tensor]:
    """Both views' frames (T x H x W x 3 uint8 each) in one `get_batch`, as mmaction2's DecordDecode reads a clip."""
    from decord import VideoReader, cpu

    video = VideoReader(str(path), ctx=cpu(0), num_threads=1)
    views = choose(len(video))
    frames = torch.from_numpy(video.get_batch([i for view in views for i in view]).asnumpy())
    return list(frames.split(len(views[0])))


def read_pyav(path: Path, choose: ChooseFrames) -> list[torch.Tensor]:
    """Each view: seek to the last keyframe at or before its first frame, decode forward to its last."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        return [_pyav_clip(container, stream, fps, view, path) for view in choose(_pyav_frames(container, stream, fps))]


def _pyav_frames(container: Any, stream: Any, fps: Fraction) -> int:
    """The stream's frame count from the container's header, else from its duration (webm, mkv)."""
    if stream.frames:
        return stream.frames
    if stream.duration:
        return max(1, int(stream.duration * stream.time_base * fps))
    return max(1, int(container.duration * fps / 1_000_000))


def _pyav_clip(container: Any, stream: Any, fps: Fraction, frames: list[int], path: Path) -> torch.Tensor:
    start = stream.start_time or 0
    first, last, wanted = min(frames), max(frames), set(frames)
    container.seek(start + int(first / fps / stream.time_base), stream=stream, backward=True, any_frame=False)
    decoded: dict[int, np.ndarray] = {}
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        index = round((frame.pts - start) * stream.time_base * fps)
        if index in wanted:
            decoded[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    if not decoded:
        raise ValueError(f"{path}: PyAV decoded no frame between frames {first} and {last}")
    # a frame the timestamps skip (a variable frame rate) is taken from its nearest decoded neighbour
    return torch.from_numpy(np.stack([decoded[min(decoded, key=lambda d: abs(d - i))] for i in frames]))


def read_torchcodec(path: Path, choose: ChooseFrames) -> list[torch.Tensor]:
    """Both views' frames in one `get_frames_at`, as torchcodec's examples sample clips."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=1)
    views = choose(len(decoder))
    return list(decoder.get_frames_at([i for view in views for i in view]).data.split(len(views[0])))


@dataclass(frozen=True)
class Peer:
    module: str  # what must import
    read: Callable[[Path, ChooseFrames], list[torch.Tensor]]
    needs: str = ""  # what else it needs, said when it does not load


PEERS = {
    "decord": Peer("decord", read_decord),
    "pyav": Peer("av", read_pyav),
    "torchcodec": Peer(
        "torchcodec.decoders",
        read_torchcodec,
        "torchcodec needs FFmpeg's shared libraries (libavcodec 4 to 8, e.g. Debian's libavdevice59) and, from "
        "0.14 on, a CUDA build of torch",
    ),
}


def peer_problem(name: str) -> str | None:
    """Why peer `name` cannot run here, or None."""
    peer = PEERS[name]
    try:
        importlib.import_module(peer.module)
    except ModuleNotFoundError:
        return f"not installed: {INSTALL}"
    except Exception as e:  # a library that is installed but does not load (OSError, RuntimeError, ...)
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{peer.module} does not load here ({cause[:160]})" + (f"; {peer.needs}" if peer.needs else "")
    return None


class PeerClips(torch.utils.data.Dataset):
    """(view1, view2, label) of video i, read by one peer library: a map-style dataset, as its users write one."""

    def __init__(
        self, videos: list[VideoFile], peer: str, clip: ClipConfig, aug: AugmentConfig | None, seed: int = 0
    ) -> None:
        self.videos, self.peer, self.read, self.views = videos, peer, PEERS[peer].read, TwoViews(clip, aug, seed)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        video = self.videos[i]
        try:
            clips = self.read(video.path, self.views.frames)
        except Exception as e:  # whatever the library raises: the message must name the file
            cause = str(e).strip()[:200] or type(e).__name__
            raise ValueError(f"{video.path}: {self.peer} cannot read it ({cause})") from e
        return *self.views(clips), video.label


def peer_loader(
    videos: list[VideoFile], peer: str, clip: ClipConfig, aug: AugmentConfig | None, batch_size: int, workers: int
) -> torch.utils.data.DataLoader:
    """Endless (view1, view2, labels) batches: shuffled epochs back to back, so every batch is full however few the
    videos. The workers live as long as an iterator of it."""
    clips = PeerClips(videos, peer, clip, aug)
    return torch.utils.data.DataLoader(
        clips,
        batch_size=batch_size,
        sampler=torch.utils.data.RandomSampler(clips, num_samples=2**62),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
