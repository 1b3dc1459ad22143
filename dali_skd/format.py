"""The shard format: what `preprocess` writes and the loader reads. docs/format.md documents it, the layout of a
dataset folder included (its one description).

One tar member group (one "sample") is one video:

    <key>.json           metadata (SampleMeta)
    <key>.cls            the 0-based label, as text
    <key>.jpgs           format "jpeg": JPEG strips laid end to end. A strip is `frames_per_jpeg` consecutive
                         frames stacked vertically into one JPEG (the last strip may hold fewer), so strip i
                         holds frames [i * frames_per_jpeg, min((i + 1) * frames_per_jpeg, frames)) and is
                         bytes [strip_offsets[i], strip_offsets[i + 1]) of the member
    <key>.webm           format "vp9": the whole video, a keyframe at least every 16 frames

One member for all strips keeps a sample to three tar headers, and lets a reader fetch only the byte range of
the strips a clip needs. Keys hold no dots (WebDataset and DALI split a member name at its first dot).
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dali_skd.files import write_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILED_NAME = "failed.jsonl"
SHARD_FORMATS = ("jpeg", "vp9")
ShardFormat = Literal["jpeg", "vp9"]
PREPROCESSING_SETTINGS = ("format", "short_side", "fps", "frames_per_jpeg", "quality")  # manifest fields
SHORT_VIDEO_FRAMES = 16  # the paper's clip length: shorter videos are counted (SplitInfo.short_videos) and looped

STRIPS_EXT = "jpgs"
VIDEO_EXT = "webm"

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class FormatError(ValueError):
    """A dataset directory, manifest or sample that does not follow the shard format."""


def sample_key(split: str, index: int) -> str:
    """The key of the `index`-th video of `split` (its place in the split's fixed, seeded order)."""
    return f"{split}-{index:07d}"


def split_member_name(name: str) -> tuple[str, str]:
    """`'train-0000001.json'` -> `('train-0000001', 'json')`: key and extension, split at the first dot."""
    base = name.rsplit("/", 1)[-1]
    key, dot, ext = base.partition(".")
    if not dot or not key:
        raise FormatError(f"tar member {name!r} has no '<key>.<extension>' form")
    return key, ext


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise FormatError(f"sample key {key!r} may only hold letters, digits, '_' and '-'")
    return key


def strip_count(frames: int, frames_per_jpeg: int) -> int:
    return -(-frames // frames_per_jpeg)


def pack_strips(strips: Sequence[bytes]) -> tuple[bytes, tuple[int, ...]]:
    """The `.jpgs` member of a sample and the `strip_offsets` of its metadata."""
    return b"".join(strips), (0, *itertools.accumulate(len(s) for s in strips))


def strip_checksums(media: bytes | memoryview, offsets: Sequence[int]) -> tuple[int, ...]:
    """The `strip_crc32` of a sample: the CRC-32 (zlib's) of each strip of its `.jpgs` member."""
    view = memoryview(media)
    return tuple(zlib.crc32(view[a:b]) for a, b in itertools.pairwise(offsets))


@dataclass(frozen=True)
class SampleMeta:
    """The `<key>.json` member of a sample."""

    label: int
    label_name: str
    source: str  # the video's path relative to the dataset root
    frames: int  # frames stored
    fps: float
    width: int  # of one stored frame
    height: int
    format: ShardFormat = "jpeg"
    frames_per_jpeg: int = 0  # 0 for vp9
    strip_offsets: tuple[int, ...] = ()  # jpeg: strip i is bytes [strip_offsets[i], strip_offsets[i + 1]) of .jpgs
    strip_crc32: tuple[int, ...] = ()  # jpeg: CRC-32 of each strip (empty in shards written before checksums)
    media_crc32: int | None = None  # vp9: CRC-32 of the .webm member (None in shards written before checksums)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> SampleMeta:
        try:
            raw = json.loads(data)
            fields = {f: raw[f] for f in cls.__dataclass_fields__ if f in raw}
            tuples = {name: tuple(fields.get(name, ())) for name in ("strip_offsets", "strip_crc32")}
            meta = cls(**{**fields, **tuples})
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"{where}: unreadable sample metadata ({e})") from e
        if meta.frames < 1 or meta.width < 1 or meta.height < 1:
            raise FormatError(f"{where}: sample metadata says {meta.frames} frames of {meta.width}x{meta.height}")
        if meta.format == "jpeg":
            if meta.frames_per_jpeg < 1:
                raise FormatError(f"{where}: jpeg sample without frames_per_jpeg")
            if len(meta.strip_offsets) != strip_count(meta.frames, meta.frames_per_jpeg) + 1:
                raise FormatError(
                    f"{where}: {len(meta.strip_offsets)} strip offsets for "
                    f"{strip_count(meta.frames, meta.frames_per_jpeg)} strips (expected one more than strips)"
                )
            if meta.strip_crc32 and len(meta.strip_crc32) != len(meta.strip_offsets) - 1:
                strips = len(meta.strip_offsets) - 1
                raise FormatError(f"{where}: {len(meta.strip_crc32)} strip checksums for {strips} strips")
        return meta


def sample_members(key: str, meta: SampleMeta, media: bytes) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order readers expect (metadata first)."""
    ext = STRIPS_EXT if meta.format == "jpeg" else VIDEO_EXT
    return [
        (f"{check_key(key)}.json", meta.to_json()),
        (f"{key}.cls", str(meta.label).encode()),
        (f"{key}.{ext}", media),
    ]


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory, e.g. "train/shard-000000.tar"
    samples: int
    bytes: int
    crc32: int | None = None  # of the whole file (None in manifests written before checksums)


@dataclass
class SplitInfo:
    samples: int = 0
    frames: int = 0
    short_videos: int = 0  # videos with fewer frames than one clip; the loader loops them
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class ShardManifest:
    """`manifest.json`: everything a reader needs to know about a preprocessed dataset."""

    dataset: str
    split_number: int | None
    classes: list[str]  # label order: classes[label] is the name of label `label`
    format: ShardFormat
    frames_per_jpeg: int  # 0 for vp9
    short_side: int
    fps: float | None  # None: each video keeps its own (constant) frame rate
    quality: int
    splits: dict[str, SplitInfo]
    failures: int = 0
    tools: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocessing(self) -> dict[str, Any]:
        """The settings that shaped the stored frames: a model trained on them expects new videos made the same way
        (`cli.py predict` transcodes with them)."""
        return {name: getattr(self, name) for name in PREPROCESSING_SETTINGS}

    def split(self, name: str, where: str | Path = "") -> SplitInfo:
        if name not in self.splits:
            raise FormatError(f"{where or 'manifest'}: no split {name!r} (it has {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path, name: str = MANIFEST_NAME) -> Path:
        """Write `name` (a `--part` run writes `manifest.part-I-of-N.json`) atomically: readers never see half of it."""
        path = Path(directory) / name
        write_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest") -> ShardManifest:
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where} was written by shard format version {version}; this dali-skd reads version "
                f"{FORMAT_VERSION}: re-run `python cli.py preprocess` into a new --out directory"
            )
        try:
            splits = {
                name: SplitInfo(**{**s, "shards": [ShardInfo(**sh) for sh in s.get("shards", [])]})
                for name, s in raw["splits"].items()
            }
            manifest = cls(**{**raw, "splits": splits})
        except (KeyError, TypeError) as e:
            raise FormatError(f"{where} is not a dali-skd manifest ({e}): re-run `python cli.py preprocess`") from e
        if manifest.format not in SHARD_FORMATS:
            raise FormatError(f"{where}: unknown shard format {manifest.format!r}")
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> ShardManifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            hint = ""
            if Path(directory).is_dir() and any(Path(directory).glob("manifest.part-*.json")):
                hint = f" (it holds part manifests: run `python cli.py preprocess merge {directory}`)"
            raise FormatError(
                f"no {MANIFEST_NAME} in {directory}{hint}: point --data at a directory written by "
                "`python cli.py preprocess ... --out DIR`"
            )
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            raise FormatError(f"{path} is not valid JSON ({e}): re-run `python cli.py preprocess`") from e
        return cls.from_dict(raw, str(path))
