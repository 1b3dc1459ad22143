"""Which frames a clip takes and which JPEG strips (and rows of them) must be decoded to get them.

Pure functions of integer arrays, one row per clip, so that a whole batch is planned in a few numpy calls: the
loader's only per-clip logic that is not DALI's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def clip_span(clip_len: int, stride: int = 1) -> int:
    """Frames from a clip's first to its last: `clip_len` frames, every `stride`-th."""
    return (clip_len - 1) * stride + 1


def random_starts(frames: np.ndarray, clip_len: int, uniform: np.ndarray, stride: int = 1) -> np.ndarray:
    """Start frames from uniform draws in [0, 1), one per element of `uniform` (rows follow `frames`): a clip
    never runs past the end, and a video shorter than a clip loops from a random frame."""
    frames = frames.reshape(-1, *[1] * (uniform.ndim - 1))
    span = clip_span(clip_len, stride)
    choices = np.where(frames >= span, frames - span + 1, frames)
    return np.minimum((uniform * choices).astype(np.int64), choices - 1)


def spaced_starts(frames: int, clip_len: int, clips: int, stride: int = 1) -> np.ndarray:
    """`clips` start frames spread uniformly over the video, first and last clip touching its ends."""
    return np.linspace(0, max(frames - clip_span(clip_len, stride), 0), clips).round().astype(np.int64)


def clip_frames(frames: np.ndarray, starts: np.ndarray, clip_len: int, stride: int = 1) -> np.ndarray:
    """(..., clip_len) frame indices of clips from `starts` (rows follow `frames`), every `stride`-th frame; a
    video shorter than the clip is looped."""
    frames = frames.reshape(-1, *[1] * starts.ndim)
    return (starts[..., None] + stride * np.arange(clip_len)) % frames


def strip_slots(clip_len: int, frames_per_jpeg: int, stride: int = 1) -> int:
    """The most strips one clip can touch: the pipeline has this many decoder inputs per view."""
    return min(clip_len, -(-(clip_span(clip_len, stride) - 1) // frames_per_jpeg) + 1)


@dataclass(frozen=True)
class StripPlan:
    """What to decode for each clip (row): strip `strips[r, k]`'s top `rows[r, k]` frames, for every slot k; the
    clip is then frame `order[r, t]` of those decoded frames laid end to end. Unused slots repeat the last strip
    with one frame, because the pipeline's inputs are fixed in number."""

    strips: np.ndarray  # (R, slots) int64, ascending
    rows: np.ndarray  # (R, slots) int64
    order: np.ndarray  # (R, clip_len) int32


def plan_strips(frame_indices: np.ndarray, frames_per_jpeg: int, slots: int) -> StripPlan:
    """Cover each row of `frame_indices` (R, T) with `slots` strip decodes, each decoding no further down its strip
    than needed: decoding the top rows of a JPEG costs only those rows, while skipping rows still costs their
    entropy decoding, so each strip is decoded from its top down to its last needed frame."""
    strip = frame_indices // frames_per_jpeg
    local = frame_indices - strip * frames_per_jpeg
    ordered = np.sort(strip, axis=1)
    first = np.ones(ordered.shape, bool)  # the first occurrence of each strip in the sorted row
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    used = first.sum(axis=1)
    if (used > slots).any():
        raise ValueError(f"a clip touches {used.max()} strips, more than the {slots} slots")
    slot = ((ordered[:, None, :] < strip[:, :, None]) & first[:, None, :]).sum(axis=2)  # distinct strips below
    in_slot = slot[:, :, None] == np.arange(slots)  # (R, T, slots)
    rows = np.where(in_slot, local[:, :, None] + 1, 0).max(axis=1)
    strips = np.where(in_slot, strip[:, :, None], -1).max(axis=1)
    pad = rows == 0
    strips = np.where(pad, strips.max(axis=1, keepdims=True), strips)
    rows = np.where(pad, 1, rows)
    begin = np.cumsum(rows, axis=1) - rows
    order = np.take_along_axis(begin, slot, axis=1) + local
    return StripPlan(strips, rows, order.astype(np.int32))
