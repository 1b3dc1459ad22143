"""The shard format: what `preprocess` writes and the loader reads. docs/format.md documents it, the layout of a
dataset folder included (its one description), and docs/manifest.schema.json is its manifest's JSON Schema, made
from the declarations here (`manifest_schema`) for other tools that check a dataset.

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

A manifest and a sample's metadata are input from strangers: pydantic checks every field against its type here,
which also says in words what the field holds (a message's "expected ...", the schema's descriptions), and
`_check_manifest`/`_check_sample` check what one field cannot say alone. Fields this version does not know are
ignored, with one warning per name.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from dali_skd.errors import InputError
from dali_skd.files import write_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILED_NAME = "failed.jsonl"
SHARD_FORMATS = ("jpeg", "vp9")
PREPROCESSING_SETTINGS = ("format", "short_side", "fps", "frames_per_jpeg", "quality", "optimize_huffman")  # manifest
SHORT_VIDEO_FRAMES = 16  # the paper's clip length: shorter videos are counted (SplitInfo.short_videos) and looped

STRIPS_EXT = "jpgs"
VIDEO_EXT = "webm"

KEY_PATTERN = r"^[A-Za-z0-9_-]+$"  # a sample key, a split's name
# a shard path: relative, no '..' part and no '//', letters, digits and -_./ only, never starting like an option:
# all that is ever put into a `pipe:` command or a URL
PATH_PATTERN = r"^(?!(?:.*/)?\.\.(?:/|$))(?!.*//)[A-Za-z0-9_.][A-Za-z0-9_./-]*$"
_KEY_RE, _PATH_RE = re.compile(KEY_PATTERN), re.compile(PATH_PATTERN)

MAX_COUNT = 10**9  # samples of a split, frames of a video, labels: far beyond any dataset; more is a damaged file
MAX_BYTES = 1 << 44  # of one shard
MIN_SAMPLE_BYTES = 3 * 2 * 512  # three tar members, each a header block and at least one data block

log = logging.getLogger(__name__)


class FormatError(InputError):
    """A dataset directory, manifest or sample that does not follow the shard format."""


def check_relative_path(path: str, where: str = "shard path") -> str:
    """`path` if it is a path inside a dataset (`PATH_PATTERN`): what a manifest may name, and all that is ever put
    into a `pipe:` command or a URL."""
    if not isinstance(path, str) or not _PATH_RE.match(path):
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


# -- the fields' types: each says in words what it holds (`description`), for messages and the schema -------------


def _offsets_from_zero(offsets: tuple[int, ...]) -> tuple[int, ...]:
    if offsets and (offsets[0] != 0 or any(b < a for a, b in itertools.pairwise(offsets))):
        raise PydanticCustomError("expected", "byte offsets from 0, never decreasing")
    return offsets


Count = Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT, description="a count ≥ 0")]
Frames = Annotated[int, Strict(), Field(ge=1, le=MAX_COUNT, description="a count ≥ 1")]
Side = Annotated[int, Strict(), Field(ge=1, le=65535, description="a whole number from 1 to 65,535")]
FramesPerJpeg = Annotated[int, Strict(), Field(ge=0, le=1024, description="a whole number from 0 to 1,024")]
Quality = Annotated[int, Strict(), Field(ge=0, le=100, description="a whole number from 0 to 100")]
Bytes = Annotated[int, Strict(), Field(ge=0, le=MAX_BYTES, description=f"a whole number from 0 to {MAX_BYTES:,}")]
Text = Annotated[str, Strict(), Field(min_length=1, description="a non-empty string")]
Fps = Annotated[float, Strict(), Field(gt=0, le=10_000, description="a number > 0 and ≤ 10000")]
Seconds = Annotated[
    float, Strict(), Field(ge=0, le=MAX_COUNT, description=f"a number of seconds ≥ 0 and ≤ {MAX_COUNT:g}")
]
ShardFormat = Annotated[Literal["jpeg", "vp9"], Field(description='"jpeg" or "vp9"')]
Crc32 = Annotated[int, Strict(), Field(ge=0, lt=1 << 32, description="a CRC-32, a whole number from 0 to 2^32 - 1")]
ShardPath = Annotated[
    str, Strict(), Field(pattern=PATH_PATTERN, description="a relative path of letters, digits and -_./, without '..'")
]
SplitName = Annotated[str, Field(pattern=KEY_PATTERN, description="names of letters, digits, '_' and '-' only")]
StripOffsets = Annotated[
    tuple[Annotated[int, Strict(), Field(ge=0, le=MAX_BYTES)], ...],
    AfterValidator(_offsets_from_zero),
    Field(description="a list of byte offsets"),
]
Checksums = Annotated[tuple[Crc32, ...], Field(description="a list of CRC-32s")]

# a record of the format: a field it does not know is ignored, once said; a shard path is checked by Python's `re`
# (the pattern looks ahead, which pydantic's own regex engine does not)
RECORD = ConfigDict(extra="ignore", allow_inf_nan=False, regex_engine="python-re")
_unknown_warned: set[tuple[str, str]] = set()


class _Record:
    """What every record of the format does with a field it does not know: says so, once, and ignores it."""

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for name in sorted(raw.keys() - cls.__dataclass_fields__.keys()):
                if (cls.__name__, name) not in _unknown_warned:
                    _unknown_warned.add((cls.__name__, name))
                    log.warning("%s field %r is unknown to this dali-skd (a newer one's?): ignored", cls.__name__, name)
        return raw


# what the JSON Schema says beyond each field's type (`_check_manifest` checks it, and what no schema can say: sums)
_STRIPS_OF_JPEG = {
    "if": {"properties": {"format": {"const": "jpeg"}}, "required": ["format"]},
    "then": {"properties": {"frames_per_jpeg": {"minimum": 1}}},
}
_SHARDS_OF_SAMPLES = {
    "if": {"properties": {"samples": {"minimum": 1}}, "required": ["samples"]},
    "then": {"properties": {"shards": {"minItems": 1}}, "required": ["shards"]},
}


@dataclass(frozen=True, config=RECORD)
class SampleMeta(_Record):
    """The `<key>.json` member of a sample."""

    label: Count
    label_name: Text
    source: Text  # the video's path relative to the dataset root
    frames: Frames  # frames stored
    fps: Fps
    width: Side  # of one stored frame
    height: Side
    format: ShardFormat = "jpeg"
    frames_per_jpeg: FramesPerJpeg = 0  # 0 for vp9
    strip_offsets: StripOffsets = ()  # jpeg: strip i is bytes [strip_offsets[i], strip_offsets[i + 1]) of .jpgs
    strip_crc32: Checksums = ()  # jpeg: CRC-32 of each strip (empty in shards written before checksums)
    media_crc32: Crc32 | None = None  # vp9: CRC-32 of the .webm member (None in shards written before checksums)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> SampleMeta:
        """The metadata a sample's `.json` member holds, every field checked; a FormatError naming `where`."""
        try:
            meta = _adapter(cls).validate_json(data)
        except ValidationError as e:
            error = e.errors()[0]
            if error["type"] == "json_invalid":
                raise FormatError(f"{where}: unreadable sample metadata ({error['ctx']['error']})") from None
            raise FormatError(_said(cls, error, where)) from None
        _cross_checked(_check_sample, meta, where)
        return meta


def sample_members(key: str, meta: SampleMeta, media: bytes) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order readers expect (metadata first)."""
    ext = STRIPS_EXT if meta.format == "jpeg" else VIDEO_EXT
    return [
        (f"{check_key(key)}.json", meta.to_json()),
        (f"{key}.cls", str(meta.label).encode()),
        (f"{key}.{ext}", media),
    ]


@dataclass(config=RECORD)
class ShardInfo(_Record):
    path: ShardPath  # relative to the dataset directory, e.g. "train/shard-000000.tar"
    samples: Count
    bytes: Bytes
    crc32: Crc32 | None = None  # of the whole file (None in manifests written before checksums)


@dataclass(config=RECORD | ConfigDict(json_schema_extra=_SHARDS_OF_SAMPLES))
class SplitInfo(_Record):
    samples: Count = 0
    frames: Bytes = 0
    short_videos: Count = 0  # videos with fewer frames than one clip; the loader loops them
    shards: Annotated[list[ShardInfo], Field(description="a list of shards")] = dataclasses.field(default_factory=list)
    seconds: Seconds | None = None  # of video stored: frames / fps summed (None in manifests written before it)
    source_bytes: Bytes | None = None  # of the source files of the videos stored (None in manifests written before it)


@dataclass(config=RECORD | ConfigDict(json_schema_extra=_STRIPS_OF_JPEG))
class ShardManifest(_Record):
    """`manifest.json`: everything a reader needs to know about a preprocessed dataset."""

    dataset: Text
    split_number: Count | None
    # label order: classes[label] is the name of label `label`
    classes: Annotated[
        list[Text], Field(min_length=1, description="a list of class names", json_schema_extra={"uniqueItems": True})
    ]
    format: ShardFormat
    frames_per_jpeg: FramesPerJpeg  # 0 for vp9
    short_side: Side
    fps: Fps | None  # None: each video keeps its own (constant) frame rate
    quality: Quality
    # a JSON Schema's patternProperties alone would let other names through: they are refused
    splits: Annotated[
        dict[SplitName, SplitInfo], Field(description="an object", json_schema_extra={"additionalProperties": False})
    ]
    # jpeg: Huffman tables fitted to each strip (False in manifests written before)
    optimize_huffman: Annotated[bool, Strict(), Field(description="true or false")] = False
    failures: Count = 0
    tools: Annotated[dict[str, Annotated[str, Strict()]], Field(description="an object")] = dataclasses.field(
        default_factory=dict
    )
    format_version: Literal[1] = FORMAT_VERSION

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
        try:
            manifest = _adapter(cls).validate_python(raw)
        except ValidationError as e:
            raise FormatError(_said(cls, e.errors()[0], where)) from None
        _cross_checked(_check_manifest, manifest, where)
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


# -- checking what a dataset says: its manifest and sample metadata are input from strangers -----------------------


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


class _Invalid(Exception):
    """A value that fails a check across fields: its path in the document, what it is, what was expected."""

    def __init__(self, path: str, value: Any, expected: str, found: str | None = None) -> None:
        super().__init__(path)
        self.path, self.expected = path, expected
        self.found = found or f"is {_shown(value)}"


def _cross_checked(check: Any, record: Any, where: str) -> None:
    try:
        check(record)
    except _Invalid as e:
        raise FormatError(_message(where, e.path, e.found, e.expected)) from None


def _message(where: str, path: str, found: str, expected: str) -> str:
    subject = f"{where}: {path}" if path else where
    return f"{subject} {found}; expected {expected}"


def _shown(value: Any) -> str:
    """A JSON value in a message: scalars as JSON writes them (cut at 60 characters), containers by kind."""
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _said(cls: type, error: Any, where: str) -> str:
    """One of pydantic's errors as a message: where in the document, what is there, and what the field holds, in the
    words its type gives (`description` in the JSON Schema of `cls`)."""
    loc = list(error["loc"])
    named = bool(loc) and loc[-1] == "[key]"  # the name of one of an object's entries (a split's) is refused
    if named:
        loc = loc[:-2]
    found = f"has {_shown(error['input'])}" if named else f"is {_shown(error['input'])}"
    if error["type"] == "missing":
        found, expected = "is missing", "a value"
    elif error["type"] in ("dataclass_type", "dict_type"):
        expected = "an object"
    elif error["type"] == "expected":  # a check of ours, which says it
        expected = error["msg"]
    elif error["type"] == "less_than_equal" and error["ctx"]["le"] == MAX_COUNT:
        expected = f"at most {MAX_COUNT:,} (no dataset holds more)"
    else:
        expected = _description(_adapter(cls).json_schema(), loc, named)
    path = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in loc)
    return _message(where, path.removeprefix("."), found, expected)


def _description(schema: dict[str, Any], loc: list[Any], named: bool) -> str:
    """The description of the value at `loc` in a JSON Schema (pydantic's: `$ref`s into `$defs`, `anyOf` for an
    optional value), or (`named`) of the names of its entries."""

    def resolved(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return resolved(schema["$defs"][node["$ref"].rsplit("/", 1)[-1]])
        if "anyOf" in node and "description" not in node:
            return resolved(next(branch for branch in node["anyOf"] if branch.get("type") != "null"))
        return node

    node = schema
    for key in loc:
        node = resolved(node)
        if isinstance(key, int):
            node = node["items"]
        elif "properties" in node:
            node = node["properties"][key]
        else:  # an entry of an object of named entries
            node = node.get("additionalProperties") or next(iter(node["patternProperties"].values()))
    if named:
        node = resolved(node)["propertyNames"]
    return node.get("description") or resolved(node)["description"]


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
    for i, name in enumerate(manifest.classes):
        if name in manifest.classes[:i]:
            j = manifest.classes.index(name)
            raise _Invalid(f"classes[{i}]", name, f"a name not given before (it is classes[{j}] too)")
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


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.json (docs/manifest.schema.json), made from the declarations above."""
    schema = _adapter(ShardManifest).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dali-skd manifest.json",
        "description": (
            f"A preprocessed dataset's manifest, shard format version {FORMAT_VERSION} (docs/format.md). Made by "
            "`dali_skd.format.manifest_schema`. What no JSON Schema can say, dali-skd checks when it reads one: a "
            "split's samples are those its shards hold, a shard holds no more samples than its bytes can (3072 bytes "
            "each), and no shard is listed twice."
        ),
        **{key: value for key, value in schema.items() if key not in ("title", "description")},
    }


if __name__ == "__main__":  # python -m dali_skd.format > docs/manifest.schema.json
    print(json.dumps(manifest_schema(), indent=2, ensure_ascii=False))
