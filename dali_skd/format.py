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

import dataclasses
import itertools
import json
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dali_skd.errors import InputError
from dali_skd.files import write_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILED_NAME = "failed.jsonl"
SHARD_FORMATS = ("jpeg", "vp9")
ShardFormat = Literal["jpeg", "vp9"]
PREPROCESSING_SETTINGS = ("format", "short_side", "fps", "frames_per_jpeg", "quality", "optimize_huffman")  # manifest
SHORT_VIDEO_FRAMES = 16  # the paper's clip length: shorter videos are counted (SplitInfo.short_videos) and looped

STRIPS_EXT = "jpgs"
VIDEO_EXT = "webm"

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_PATH_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*$")  # a shard path: never an option, a URL or shell syntax

log = logging.getLogger(__name__)


class FormatError(InputError):
    """A dataset directory, manifest or sample that does not follow the shard format."""


def check_relative_path(path: str, where: str = "shard path") -> str:
    """`path` if it is a path inside a dataset (relative, no `..`, letters, digits and `-_./` only): what a manifest
    may name, and all that is ever put into a `pipe:` command or a URL."""
    if not isinstance(path, str) or not _PATH_RE.match(path) or ".." in path.split("/") or "//" in path:
        raise FormatError(
            f"{where} {json.dumps(path)[:80]} is refused: a dataset names its files by relative paths of letters, "
            "digits and -_./, without '..'"
        )
    return path


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
        except ValueError as e:
            raise FormatError(f"{where}: unreadable sample metadata ({e})") from e
        return parse_checked(cls, raw, where, _check_sample)


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
    seconds: float | None = None  # of video stored: frames / fps summed (None in manifests written before it)
    source_bytes: int | None = None  # of the source files of the videos stored (None in manifests written before it)


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
    optimize_huffman: bool = False  # jpeg: Huffman tables fitted to each strip (False in manifests written before)
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
    def from_dict(cls, raw: Any, where: str = "manifest") -> ShardManifest:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if isinstance(raw, dict) and version != FORMAT_VERSION:
            raise FormatError(
                f"{where} was written by shard format version {version}; this dali-skd reads version "
                f"{FORMAT_VERSION}: re-run `python cli.py preprocess` into a new --out directory"
            )
        return parse_checked(cls, raw, where, _check_manifest)

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


# -- checking what a dataset says: its manifest and sample metadata are input from strangers -----------------------
#
# SCHEMA gives each field of the format's dataclasses a parser that checks (and converts) its JSON value; a field is
# required unless its dataclass field has a default. Adding an optional field is its dataclass field plus one line
# here. Fields this version does not know are ignored, with one warning per name.

MAX_COUNT = 10**9  # samples of a split, frames of a video, labels: far beyond any dataset; more is a damaged file
MAX_BYTES = 1 << 44  # of one shard
MIN_SAMPLE_BYTES = 3 * 2 * 512  # three tar members, each a header block and at least one data block

Parse = Callable[[Any, str], Any]  # a value checked (and converted), or _Invalid naming its field's path


class _Invalid(Exception):
    """A value that fails its check: its path in the document, what it is, what was expected."""

    def __init__(self, path: str, value: Any, expected: str, found: str | None = None) -> None:
        super().__init__(path)
        self.path, self.expected = path, expected
        self.found = found or ("is missing" if value is _MISSING else f"is {_shown(value)}")

    def error(self, where: str) -> FormatError:
        subject = f"{where}: {self.path}" if self.path else where
        return FormatError(f"{subject} {self.found}; expected {self.expected}")


_MISSING = object()


def _shown(value: Any) -> str:
    """A JSON value in a message: scalars as JSON writes them (cut at 60 characters), containers by kind."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(low: int = 0, high: int = MAX_COUNT) -> Parse:
    expected = f"a count ≥ {low}" if high == MAX_COUNT else f"a whole number from {low} to {high:,}"

    def parse(value: Any, path: str) -> int:
        if type(value) is not int or value < low:
            raise _Invalid(path, value, expected)
        if value > high:
            raise _Invalid(path, value, f"at most {high:,} (no dataset holds more)" if high == MAX_COUNT else expected)
        return value

    return parse


def _number(high: float) -> Parse:
    def parse(value: Any, path: str) -> float:
        if type(value) not in (int, float) or not 0 < value <= high:
            raise _Invalid(path, value, f"a number > 0 and ≤ {high:g}")
        return value

    return parse


def _seconds(value: Any, path: str) -> float:
    if type(value) not in (int, float) or not 0 <= value <= MAX_COUNT:
        raise _Invalid(path, value, f"a number of seconds ≥ 0 and ≤ {MAX_COUNT:g}")
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(path, value, "a non-empty string")
    return value


def _boolean(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise _Invalid(path, value, "true or false")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, value, "a string")
    return value


def _one_of(*choices: Any) -> Parse:
    def parse(value: Any, path: str) -> Any:
        if value not in choices or type(value) is bool:
            raise _Invalid(path, value, " or ".join(json.dumps(c) for c in choices))
        return value

    return parse


def _optional(inner: Parse) -> Parse:
    return lambda value, path: None if value is None else inner(value, path)


def _list_of(item: Parse, what: str, unique: bool = False) -> Parse:
    def parse(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _Invalid(path, value, what)
        items = [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
        for i, v in enumerate(items):
            if unique and v in items[:i]:
                raise _Invalid(f"{path}[{i}]", v, f"a name not given before (it is {path}[{items.index(v)}] too)")
        return items

    return parse


def _mapping(item: Parse, key_names: bool = False) -> Parse:
    """An object of named entries; with `key_names`, names that sample keys can start with (splits)."""

    def parse(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Invalid(path, value, "an object")
        for name in value:
            if key_names and not _KEY_RE.match(name):
                raise _Invalid(path, name, "names of letters, digits, '_' and '-' only", f"has {_shown(name)}")
        return {name: item(v, f"{path}.{name}") for name, v in value.items()}

    return parse


def _shard_path(value: Any, path: str) -> str:
    try:
        return check_relative_path(value)
    except FormatError:
        raise _Invalid(path, value, "a relative path of letters, digits and -_./, without '..'") from None


def _strip_offsets(value: Any, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise _Invalid(path, value, "a list of byte offsets")
    if value and (value[0] != 0 or any(b < a for a, b in itertools.pairwise(value)) or value[-1] > MAX_BYTES):
        raise _Invalid(path, value, "byte offsets from 0, never decreasing")
    return tuple(value)


def _crc32(value: Any, path: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 32:
        raise _Invalid(path, value, "a CRC-32, a whole number from 0 to 2^32 - 1")
    return value


def _checksums(value: Any, path: str) -> tuple[int, ...]:
    return tuple(_list_of(_crc32, "a list of CRC-32s")(value, path))


def _record(cls: type) -> Parse:
    """A JSON object holding the fields of dataclass `cls`, each checked by SCHEMA[cls]."""
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }

    def parse(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _Invalid(path, value, "an object")
        table = SCHEMA[cls]
        for name in sorted(required - value.keys()):
            raise _Invalid(f"{path}.{name}" if path else name, _MISSING, "a value")
        for name in sorted(value.keys() - table.keys()):
            if (cls, name) not in _unknown_warned:
                _unknown_warned.add((cls, name))
                log.warning("%s field %r is unknown to this dali-skd (a newer one's?): ignored", cls.__name__, name)
        known = {name: v for name, v in value.items() if name in table}
        return cls(**{name: table[name](v, f"{path}.{name}" if path else name) for name, v in known.items()})

    return parse


_unknown_warned: set[tuple[type, str]] = set()


def parse_checked(cls: type, raw: Any, where: str, cross_check: Callable[[Any], None]) -> Any:
    """`raw` (parsed JSON) as a `cls`, every field checked; a FormatError naming `where`, the field and its value."""
    try:
        value = _record(cls)(raw, "")
        cross_check(value)
    except _Invalid as e:
        raise e.error(where) from None
    return value


def _check_sample(meta: SampleMeta) -> None:
    if meta.format != "jpeg":
        return
    if meta.frames_per_jpeg < 1:
        raise _Invalid("frames_per_jpeg", meta.frames_per_jpeg, "a count ≥ 1 for format jpeg")
    strips = strip_count(meta.frames, meta.frames_per_jpeg)
    if len(meta.strip_offsets) != strips + 1:
        raise _Invalid("strip_offsets", list(meta.strip_offsets), f"{strips + 1} offsets, one more than its strips")
    if meta.strip_crc32 and len(meta.strip_crc32) != strips:
        raise _Invalid("strip_crc32", list(meta.strip_crc32), f"{strips} checksums, one per strip (or none)")


def _check_manifest(manifest: ShardManifest) -> None:
    if not manifest.classes:
        raise _Invalid("classes", manifest.classes, "a list of class names")
    if manifest.format == "jpeg" and manifest.frames_per_jpeg < 1:
        raise _Invalid("frames_per_jpeg", manifest.frames_per_jpeg, "a count ≥ 1 for format jpeg")
    named: dict[str, str] = {}
    for name, split in manifest.splits.items():
        at = f"splits.{name}"
        listed = sum(shard.samples for shard in split.shards)
        if split.samples and not split.shards:
            raise _Invalid(f"{at}.shards", [], f"the shards of its {split.samples} samples", "lists no shard")
        if split.samples != listed:
            raise _Invalid(f"{at}.samples", split.samples, f"{listed}, the samples of the shards it lists")
        if split.short_videos > split.samples:
            raise _Invalid(f"{at}.short_videos", split.short_videos, f"at most its {split.samples} samples")
        for i, shard in enumerate(split.shards):
            if shard.samples * MIN_SAMPLE_BYTES > shard.bytes:
                fits = shard.bytes // MIN_SAMPLE_BYTES
                raise _Invalid(f"{at}.shards[{i}].samples", shard.samples, f"at most {fits} in {shard.bytes} bytes")
            if shard.path in named:
                raise _Invalid(f"{at}.shards[{i}].path", shard.path, f"a shard of its own, not {named[shard.path]}'s")
            named[shard.path] = f"{at}.shards[{i}]"


SCHEMA: dict[type, dict[str, Parse]] = {
    SampleMeta: {
        "label": _count(),
        "label_name": _text,
        "source": _text,
        "frames": _count(1),
        "fps": _number(10_000),
        "width": _count(1, 65535),
        "height": _count(1, 65535),
        "format": _one_of(*SHARD_FORMATS),
        "frames_per_jpeg": _count(0, 1024),
        "strip_offsets": _strip_offsets,
        "strip_crc32": _checksums,
        "media_crc32": _optional(_crc32),
    },
    ShardInfo: {
        "path": _shard_path,
        "samples": _count(),
        "bytes": _count(0, MAX_BYTES),
        "crc32": _optional(_crc32),
    },
    SplitInfo: {
        "samples": _count(),
        "frames": _count(0, MAX_BYTES),
        "short_videos": _count(),
        "shards": _list_of(_record(ShardInfo), "a list of shards"),
        "seconds": _optional(_seconds),
        "source_bytes": _optional(_count(0, MAX_BYTES)),
    },
    ShardManifest: {
        "dataset": _text,
        "split_number": _optional(_count()),
        "classes": _list_of(_text, "a list of class names", unique=True),
        "format": _one_of(*SHARD_FORMATS),
        "frames_per_jpeg": _count(0, 1024),
        "short_side": _count(1, 65535),
        "fps": _optional(_number(10_000)),
        "quality": _count(0, 100),
        "splits": _mapping(_record(SplitInfo), key_names=True),
        "optimize_huffman": _boolean,
        "failures": _count(),
        "tools": _mapping(_string),
        "format_version": _one_of(FORMAT_VERSION),
    },
}
