"""The loaders a user would pick instead of dali-skd, for `cli.py bench`: a plain torch DataLoader over video
files, decoded by decord, PyAV or torchcodec, each written as a competent user of the library writes it: both
views' frames decoded in one forward pass where they share a GOP (never a GOP decoded twice), through the library's
fastest documented access (decord's `get_batch`, PyAV's decoding with a seek to the keyframe, torchcodec's
`get_frames_at` in approximate seek mode), one decoding thread per worker and the workers filling the cores.

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
from collections import deque
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
from dali_skd.errors import InputError
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


def both_views(views: list[list[int]]) -> tuple[list[int], Callable[[np.ndarray], list[torch.Tensor]]]:
    """The frames both views need, once each and in order (what a decoder reads in one forward pass), and how to
    cut the views out of those frames decoded (N x H x W x 3), in numpy: torch's indexing of a uint8 tensor by a
    list is 70 times slower on the CPU (7.5 ms against 0.1 for a sample's frames)."""
    wanted = sorted({i for view in views for i in view})
    row = {index: k for k, index in enumerate(wanted)}
    return wanted, lambda frames: [torch.from_numpy(frames[[row[i] for i in view]]) for view in views]


def read_decord(path: Path, choose: ChooseFrames) -> list[torch.Tensor]:
    """Both views' frames in one `get_batch`, as mmaction2's DecordDecode reads a clip, in ascending order: decord
    decodes forward to a later index (skipping to a later keyframe when there is one) but seeks back for an earlier
    one, decoding its GOP again."""
    from decord import VideoReader, cpu

    video = VideoReader(str(path), ctx=cpu(0), num_threads=1)
    wanted, cut = both_views(choose(len(video)))
    return cut(video.get_batch(wanted).asnumpy())


def read_pyav(path: Path, choose: ChooseFrames) -> list[torch.Tensor]:
    """Both views in one pass where they share a GOP: a seek to the keyframe at or before the earlier view's first
    frame, then decoding forward to the later view's last (`pyav_decode`)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        wanted, cut = both_views(choose(_pyav_frames(container, stream, fps)))
        frames, _ = pyav_decode(container, stream, fps, wanted, path)
        return cut(frames)


def _pyav_frames(container: Any, stream: Any, fps: Fraction) -> int:
    """The stream's frame count from the container's header, else from its duration (webm, mkv)."""
    if stream.frames:
        return stream.frames
    if stream.duration:
        return max(1, int(stream.duration * stream.time_base * fps))
    return max(1, int(container.duration * fps / 1_000_000))


def pyav_decode(container: Any, stream: Any, fps: Fraction, wanted: list[int], path: Path) -> tuple[np.ndarray, int]:
    """Frames `wanted` (ascending) as N x H x W x 3 RGB, and how many frames were decoded for them. One seek to the
    keyframe at or before the first; decoding forward, a frame is converted only when wanted. At a keyframe, when
    the next wanted frame lies past the next keyframe too (as far as the last two were apart), one more seek: a far
    view costs no decoding of the GOPs between. A frame the timestamps skip (a variable frame rate) is the next one
    decoded; frames past the last decoded are that last one."""
    start = stream.start_time or 0
    pending = deque(wanted)
    rows: list[np.ndarray] = []
    decoded, target = 0, None
    while pending and target != pending[0]:
        target, last_key = pending[0], None
        container.seek(start + int(target / fps / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            decoded += 1
            index = round((frame.pts - start) * stream.time_base * fps)
            if pending[0] <= index:
                rgb = frame.to_ndarray(format="rgb24")
                while pending and pending[0] <= index:
                    pending.popleft()
                    rows.append(rgb)
            if not pending:
                break
            if frame.key_frame:
                if last_key is not None and pending[0] != target and pending[0] >= 2 * index - last_key:
                    break
                last_key = index
        else:
            break  # the end of the stream
    if not rows:
        raise ValueError(f"{path}: PyAV decoded no frame from frame {wanted[0]} on")
    rows += rows[-1:] * len(pending)
    return np.stack(rows), decoded


def read_torchcodec(path: Path, choose: ChooseFrames) -> list[torch.Tensor]:
    """Both views' frames in one `get_frames_at` (torchcodec decodes them in ascending order), as its examples
    sample clips, with `seek_mode="approximate"`: its documented speed-up, no scan of the file when the decoder is
    made (one per sample here); the re-encoded videos' headers are exact."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=1, seek_mode="approximate")
    wanted, cut = both_views(choose(len(decoder)))
    return cut(decoder.get_frames_at(wanted).data.numpy())


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
            raise InputError(f"{video.path}: {self.peer} cannot read it ({cause})") from e
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
