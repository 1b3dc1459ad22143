"""Which frames a clip takes and which JPEG strips (and rows of them) must be decoded to get them.

Pure functions of integers: the loader's only per-sample logic that is not DALI's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def random_start(frames: int, clip_len: int, rng: np.random.Generator) -> int:
    """A uniform start frame: a clip never runs past the end, and a video shorter than a clip loops."""
    return int(rng.integers(0, frames - clip_len + 1)) if frames >= clip_len else int(rng.integers(0, frames))


def spaced_starts(frames: int, clip_len: int, clips: int) -> list[int]:
    """`clips` start frames spread uniformly over the video, first and last clip touching its ends."""
    return np.linspace(0, max(frames - clip_len, 0), clips).round().astype(int).tolist()


def clip_frames(frames: int, clip_len: int, start: int) -> list[int]:
    """The frame indices of a clip; a video shorter than the clip is looped."""
    return [(start + t) % frames for t in range(clip_len)]


def strip_slots(clip_len: int, frames_per_jpeg: int) -> int:
    """The most strips one clip can touch: the pipeline has this many decoder inputs per view."""
    return min(clip_len, -(-(clip_len - 1) // frames_per_jpeg) + 1)


@dataclass(frozen=True)
class StripPlan:
    """What to decode for one clip: strip `strips[k]`'s top `rows[k]` frames, for every slot k; the clip is then
    frame `order[t]` of those decoded frames laid end to end."""

    strips: tuple[int, ...]
    rows: tuple[int, ...]
    order: np.ndarray  # (clip_len,) int32


def plan_strips(frame_indices: Sequence[int], frames_per_jpeg: int, slots: int) -> StripPlan:
    """Cover `frame_indices` with `slots` strip decodes, each decoding no further down its strip than needed.

    Decoding the top rows of a JPEG costs only those rows, while skipping rows still costs their entropy
    decoding, so each strip is decoded from its top down to its last needed frame. Unused slots repeat the last
    strip with one frame (the pipeline's inputs are fixed in number). Plain integers: this runs per clip.
    """
    rows: dict[int, int] = {}
    for i in frame_indices:
        strip = i // frames_per_jpeg
        rows[strip] = max(rows.get(strip, 0), i - strip * frames_per_jpeg + 1)
    strips = sorted(rows)
    if len(strips) > slots:
        raise ValueError(f"a clip touches {len(strips)} strips, more than the {slots} slots")
    offset, start = 0, {}
    for strip in strips:
        start[strip], offset = offset, offset + rows[strip]
    order = np.array([start[i // frames_per_jpeg] + i % frames_per_jpeg for i in frame_indices], np.int32)
    pad = slots - len(strips)
    return StripPlan(tuple(strips) + (strips[-1],) * pad, tuple(rows[s] for s in strips) + (1,) * pad, order)
