"""Tiny shard datasets with frames whose pixels say where they came from, for the loader's tests.

Frame t of a video: red rises from left to right, green from top to bottom, blue encodes t. Written with the
preprocess stage's own shard writer and JPEG encoder, so the bytes are those a real run writes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from dali_skd.format import SampleMeta, ShardInfo, ShardManifest, SplitInfo, pack_strips, sample_key, sample_members
from preprocess.shards import ShardWriter
from preprocess.transcode import encode_jpeg

BLUE_BASE, BLUE_STEP = 10, 6  # blue of frame t; up to 40 frames stay below 255


def gradient_frames(frames: int, height: int = 128, width: int = 170) -> np.ndarray:
    x = np.linspace(40, 210, width)[None, :].repeat(height, 0)
    y = np.linspace(40, 210, height)[:, None].repeat(width, 1)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0], out[t, ..., 1], out[t, ..., 2] = x, y, BLUE_BASE + BLUE_STEP * t
    return out


def noise_frames(frames: int, seed: int, height: int = 48, width: int = 64, tint: int | None = None) -> np.ndarray:
    """Colourful 4x4-pixel blocks: every augmentation visibly changes them. A `tint` channel is made brighter, a
    class cue a small model learns in a few steps."""
    blocks = np.random.default_rng(seed).integers(30, 226, (frames, height // 4, width // 4, 3), dtype=np.uint8)
    if tint is not None:
        blocks[..., tint] = np.maximum(blocks[..., tint], 200)
    return blocks.repeat(4, axis=1).repeat(4, axis=2)


def frame_index(view: np.ndarray) -> np.ndarray:
    """The source frame of each frame of a 3 x T x H x W view in [-1, 1] (from its blue channel)."""
    blue = (view[2].mean(axis=(1, 2)) + 1) * 127.5
    return np.rint((blue - BLUE_BASE) / BLUE_STEP).astype(int)


def encode_strips(frames: np.ndarray, frames_per_jpeg: int) -> list[bytes]:
    _, h, w, _ = frames.shape
    with tempfile.TemporaryFile() as scratch:
        return [
            encode_jpeg(group.tobytes(), w, len(group) * h, 95, scratch)
            for group in (frames[s : s + frames_per_jpeg] for s in range(0, len(frames), frames_per_jpeg))
        ]


def write_dataset(
    root: Path,
    splits: dict[str, list[tuple[np.ndarray, int]]],
    classes: list[str],
    frames_per_jpeg: int = 8,
    per_shard: int = 3,
) -> Path:
    """`splits`: name -> [(frames T x H x W x 3, label)]; writes shards of `per_shard` videos and the manifest."""
    infos = {}
    for split, videos in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for first in range(0, len(videos), per_shard):
            path = root / split / f"shard-{first // per_shard:06d}.tar"
            writer = ShardWriter(path)
            for index in range(first, min(first + per_shard, len(videos))):
                frames, label = videos[index]
                media, offsets = pack_strips(encode_strips(frames, frames_per_jpeg))
                t, h, w, _ = frames.shape
                meta = SampleMeta(
                    label, classes[label], f"{split}/{index}.avi", t, 25.0, w, h, "jpeg", frames_per_jpeg, offsets
                )
                writer.add(sample_members(sample_key(split, index), meta, media))
            shards.append(ShardInfo(str(path.relative_to(root)), writer.samples, writer.finish()))
        infos[split] = SplitInfo(len(videos), sum(len(f) for f, _ in videos), 0, shards)
    short = min(min(f.shape[1:3]) for videos in splits.values() for f, _ in videos)
    ShardManifest("test", None, classes, "jpeg", frames_per_jpeg, short, None, 95, infos).save(root)
    return root
