"""Is a sample what its dataset's format promises? The checks the loader makes before DALI sees a sample, and
`preprocess verify` makes on every sample of every shard, written once for both:

- it belongs to its dataset (`admission_problem`): the manifest's format and frames per strip, a label among its
  classes, a key `<split>-<index>` of one of its splits;
- its media are sound: a JPEG strip's checksum and header (`strip_problem`), a webm's checksum and header
  (`video_problem`). DALI would stop the whole pipeline on a stream that is not what it expects, or decode a
  damaged one to grey without a word; the header sniffers (`jpeg_problem`, `webm_problem`) read a member's first
  bytes only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from dali_skd.format import SampleMeta, ShardManifest

VIDEOS_PER_SPLIT = 1 << 32  # video ids: the key's split (its place among the manifest's) times this, plus its index


def admission_problem(key: str, meta: SampleMeta, manifest: ShardManifest) -> str | None:
    """Why a sample cannot be used with its dataset, or None: its format or frames per strip are not the manifest's
    (the pipeline is built for those), its label is not one of the manifest's classes (it would reach the loss as
    an out-of-range index), its key is not `<split>-<index>` of one of its splits (a video's id)."""
    if meta.format != manifest.format:
        return f"format {meta.format}, the manifest says {manifest.format}"
    if meta.format == "jpeg" and meta.frames_per_jpeg != manifest.frames_per_jpeg:
        return f"{meta.frames_per_jpeg} frames per JPEG, the manifest says {manifest.frames_per_jpeg}"
    if meta.label >= manifest.num_classes:
        return f"label {meta.label} is not one of the manifest's classes (labels 0 to {manifest.num_classes - 1})"
    split, _, index = key.rpartition("-")
    if split not in manifest.splits or not index.isdigit() or int(index) >= VIDEOS_PER_SPLIT:
        return f"its key is not <split>-<index> for a split of the manifest ({', '.join(manifest.splits)})"
    return None


def strip_problem(meta: SampleMeta, media: memoryview, offsets: Sequence[int], strip: int) -> str | None:
    """Why strip `strip` of a sample's `.jpgs` member is damaged, or None: its checksum, where the shard has one, then
    its header. DALI would decode garbled bytes to grey without a word, and stop the whole pipeline on some (a bogus
    Huffman table); the header check alone catches neither."""
    data = media[offsets[strip] : offsets[strip + 1]]
    if meta.strip_crc32 and zlib.crc32(data) != meta.strip_crc32[strip]:
        return f"strip {strip}: checksum mismatch (its bytes changed after preprocess wrote them)"
    held = min(meta.frames_per_jpeg, meta.frames - strip * meta.frames_per_jpeg)
    problem = jpeg_problem(data, meta.width, held * meta.height)
    return f"strip {strip}: {problem}" if problem else None


def video_problem(meta: SampleMeta, media: memoryview) -> str | None:
    """Why a sample's `.webm` member is damaged or unusable, or None: its checksum (where recorded), its header."""
    if meta.media_crc32 is not None and zlib.crc32(media) != meta.media_crc32:
        return "webm checksum mismatch (its bytes changed after preprocess wrote them)"
    return webm_problem(media)


def jpeg_problem(data: memoryview | np.ndarray, width: int, height: int) -> str | None:
    """Why `data` is not a complete baseline/progressive JPEG of `width` x `height`, or None if it looks fine.

    DALI would stop the whole pipeline on a stream that is not a JPEG, and silently decode a truncated one to
    grey, so each strip is checked before it is decoded: start and end markers and the frame header's size.
    """
    buf = bytes(data[:2048])
    if len(data) < 4 or buf[:2] != b"\xff\xd8":
        return "not a JPEG"
    if bytes(data[-2:]) != b"\xff\xd9":
        return "truncated JPEG"
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return "corrupt JPEG header"
        marker = buf[i + 1]
        seg = int.from_bytes(buf[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            h = int.from_bytes(buf[i + 5 : i + 7], "big")
            w = int.from_bytes(buf[i + 7 : i + 9], "big")
            if (w, h) != (width, height):
                return f"JPEG is {w}x{h}, metadata says {width}x{height}"
            return None
        i += 2 + seg
    return "no JPEG frame header"


def webm_problem(data: memoryview | np.ndarray) -> str | None:
    """Why a `.webm` member is not the VP9 video the format promises, or None. A codec DALI cannot decode on the
    CPU (it takes only VP8, VP9 and MJPEG there) would otherwise stop the pipeline with an unhelpful assertion."""
    head = bytes(data[:2048])
    if head[:4] != b"\x1a\x45\xdf\xa3":
        return "not a webm (no Matroska header)"
    at = head.find(b"\x86")  # the CodecID element: an ID byte, a size byte, then the name
    while at != -1 and head[at + 2 : at + 4] != b"V_":
        at = head.find(b"\x86", at + 1)
    if at == -1:
        return "webm without a video track"
    codec = head[at + 2 : at + 2 + (head[at + 1] & 0x7F)].decode("ascii", "replace")
    if codec != "V_VP9":
        return (
            f"the webm holds {codec}, but the shards' format is VP9 (DALI decodes only VP8, VP9 and MJPEG on the "
            "CPU): re-run `python cli.py preprocess --format vp9` (or --format jpeg)"
        )
    return None
