"""Tiny shard datasets with frames whose pixels say where they came from, for the loader's and evaluator's tests.

Frame t of a gradient video: red rises from left to right, green from top to bottom, blue encodes t. Flat videos
say their video and frame in their colour, for a stub model with known outputs. Written with the
preprocess stage's own shard writer and JPEG encoder, so the bytes are those a real run writes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dali_skd.config import PreprocessConfig
from dali_skd.format import (
    SampleMeta,
    ShardInfo,
    ShardManifest,
    SplitInfo,
    pack_strips,
    sample_key,
    sample_members,
    strip_checksums,
)
from preprocess.shards import ShardWriter
from preprocess.transcode import DEFAULT_QUALITY, encode_jpeg

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


RED_BASE, RED_STEP, GREEN_BASE, GREEN_STEP = 30, 20, 30, 15  # flat_frames: red says the video, green the frame


def flat_frames(video: int, frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames of one flat colour each: red says the video (0-9), green the frame (0-13), for `LookupModel`."""
    out = np.full((frames, height, width, 3), 128, np.uint8)
    out[..., 0] = RED_BASE + RED_STEP * video
    out[..., 1] = (GREEN_BASE + GREEN_STEP * np.arange(frames))[:, None, None]
    return out


class LookupModel(nn.Module):
    """A stub classifier with known outputs: the logits `table[(video, start)]` for the clip of `flat_frames` video
    `video` that starts at frame `start` (clips in [-1, 1], the paper's input norm)."""

    def __init__(self, table: dict[tuple[int, int], list[float]]) -> None:
        super().__init__()
        self.table = table

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        levels = (clips.float() + 1) * 127.5
        red, green = levels[:, 0].mean(dim=(1, 2, 3)), levels[:, 1].mean(dim=(1, 2, 3))
        videos = ((red - RED_BASE) / RED_STEP).round().int().tolist()
        middle = (clips.shape[2] - 1) / 2  # a clip's mean green is that of its middle frame
        starts = ((green - GREEN_BASE) / GREEN_STEP - middle).round().int().tolist()
        return torch.tensor([self.table[key] for key in zip(videos, starts, strict=True)])


def frame_index(view: np.ndarray) -> np.ndarray:
    """The source frame of each frame of a 3 x T x H x W view in [-1, 1] (from its blue channel)."""
    blue = (view[2].mean(axis=(1, 2)) + 1) * 127.5
    return np.rint((blue - BLUE_BASE) / BLUE_STEP).astype(int)


def encode_strips(
    frames: np.ndarray, frames_per_jpeg: int, quality: int = 95, optimize_huffman: bool = False
) -> list[bytes]:
    _, h, w, _ = frames.shape
    with tempfile.TemporaryFile() as scratch:
        return [
            encode_jpeg(group.tobytes(), w, len(group) * h, quality, optimize_huffman, scratch)
            for group in (frames[s : s + frames_per_jpeg] for s in range(0, len(frames), frames_per_jpeg))
        ]


def default_strips(frames: np.ndarray) -> list[bytes]:
    """`frames` as `preprocess` stores them by default: its quality, frames per JPEG and Huffman tables."""
    cfg = PreprocessConfig()
    return encode_strips(frames, cfg.frames_per_jpeg, DEFAULT_QUALITY["jpeg"], cfg.optimize_huffman)


def dali_decoded(strips: list[bytes], device: str, hw_decoder_load: float = 0.0) -> list[np.ndarray]:
    """Each strip decoded by DALI's image decoder as the loader's pipeline sets it up: on the CPU ("cpu"), or with
    nvJPEG ("mixed": the CUDA decoder at hw_decoder_load 0, the hardware engine at 1)."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_skd.data.pipeline import DecoderOptions

    gpu = device == "mixed"
    arrays = [np.frombuffer(strip, np.uint8) for strip in strips]

    @pipeline_def(batch_size=len(strips), num_threads=1, device_id=0 if gpu else None)
    def decode():
        data = fn.external_source(source=lambda: arrays, batch=True)
        options = DecoderOptions(hw_decoder_load=hw_decoder_load).arguments(gpu)
        return fn.decoders.image(data, device=device, output_type=types.RGB, **options)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    out = out.as_cpu() if gpu else out
    return [np.array(out.at(i)) for i in range(len(strips))]


def write_dataset(
    root: Path,
    splits: dict[str, list[tuple[np.ndarray, int]]],
    classes: list[str],
    frames_per_jpeg: int = 8,
    per_shard: int = 3,
    checksums: bool = True,
    sources: dict[str, list[str]] | None = None,
) -> Path:
    """`splits`: name -> [(frames T x H x W x 3, label)]; writes shards of `per_shard` videos and the manifest, with
    the checksums preprocess records (`checksums=False`: as shards written before them). `sources`: the videos'
    paths in the dataset for some splits, in the order of `splits` (default `<split>/<index>.avi`)."""
    infos = {}
    for split, videos in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        shards, named = [], (sources or {}).get(split)
        for first in range(0, len(videos), per_shard):
            path = root / split / f"shard-{first // per_shard:06d}.tar"
            writer = ShardWriter(path)
            for index in range(first, min(first + per_shard, len(videos))):
                frames, label = videos[index]
                media, offsets = pack_strips(encode_strips(frames, frames_per_jpeg))
                t, h, w, _ = frames.shape
                crcs = strip_checksums(media, offsets) if checksums else ()
                source = named[index] if named else f"{split}/{index}.avi"
                meta = SampleMeta(label, classes[label], source, t, 25.0, w, h, "jpeg", frames_per_jpeg, offsets, crcs)
                writer.add(sample_members(sample_key(split, index), meta, media))
            size, crc = writer.finish(), writer.crc32 if checksums else None
            shards.append(ShardInfo(str(path.relative_to(root)), writer.samples, size, crc))
        infos[split] = SplitInfo(len(videos), sum(len(f) for f, _ in videos), 0, shards)
    short = min(min(f.shape[1:3]) for videos in splits.values() for f, _ in videos)
    ShardManifest("test", None, classes, "jpeg", frames_per_jpeg, short, None, 95, infos).save(root)
    return root


def damage_strip(root: Path, split: str, key: str, how: str, strip: int = 0) -> None:
    """Damages strip `strip` of sample `key` in place, in its shard (same length: the tar stays sound), as copies
    between disks and stores do. `garble`: 3,000 random bytes into its entropy-coded data (libjpeg decodes it to
    grey with a warning); `huffman`: a bogus Huffman table (libjpeg gives up: fatal for DALI's CPU decoder)."""
    for shard in sorted((root / split).glob("*.tar")):
        raw = bytearray(shard.read_bytes())
        member = raw.find(f"{key}.jpgs".encode())
        if member == -1:
            continue
        start = raw.find(b"\xff\xd8\xff", member)
        for _ in range(strip):
            start = raw.find(b"\xff\xd8\xff", start + 2)
        end = raw.find(b"\xff\xd9", start) + 2
        jpeg = raw[start:end]
        if how == "garble":
            scan = jpeg.find(b"\xff\xda") + 20
            size = min(3000, len(jpeg) - scan - 200)
            jpeg[scan : scan + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        else:
            counts = jpeg.find(b"\xff\xc4") + 5  # a DHT's 16 code counts: two more codes of length 1 than fit
            for k in range(15, 0, -1):
                if jpeg[counts + k] >= 2:
                    jpeg[counts + k] -= 2
                    jpeg[counts] += 2
                    break
        raw[start:end] = jpeg
        shard.write_bytes(bytes(raw))
        return
    raise ValueError(f"no sample {key} in {root / split}")
