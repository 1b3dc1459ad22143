"""Reading shards: where they are (local, http(s), `pipe:`), which ones a rank reads, and the samples in them.

Nothing here decodes or unpickles: a sample is its raw member bytes plus the parsed `<key>.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from braceexpand import braceexpand

from dali_skd.data.remote import READ_TIMEOUT, is_remote, join_location, open_url
from dali_skd.format import (
    MANIFEST_NAME,
    FormatError,
    SampleMeta,
    ShardManifest,
    check_key,
    split_member_name,
)

log = logging.getLogger(__name__)

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_MAX_NAME_RECORD = 1 << 20  # a PAX or GNU long-name record; longer is a broken header
MAX_MEMBER_BYTES = 1 << 34  # one tar member (a whole video): larger is a broken header
MAX_MANIFEST_BYTES = 64 << 20


def load_manifest(location: str, read_timeout: float = READ_TIMEOUT) -> ShardManifest:
    """The manifest of a dataset location, local or remote."""
    if not is_remote(location):
        return ShardManifest.load(location)
    url = join_location(location, MANIFEST_NAME)
    try:
        with open_url(url, read_timeout) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise FormatError(f"cannot read {url}: {e}") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{url} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a dali-skd manifest")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{url} is not valid JSON ({e})") from e
    return ShardManifest.from_dict(data, url)


def expand_urls(spec: str) -> list[str]:
    """Shard URLs from a brace pattern (`shard-{000000..000099}.tar`); several patterns separated by spaces."""
    return [url for part in spec.split() for url in braceexpand(part)]


def split_urls(location: str, manifest: ShardManifest, split: str, override: str | None = None) -> list[str]:
    """The shard URLs of `split`: the manifest's, or `override` (a brace pattern) when given."""
    if override:
        urls = expand_urls(override)  # the user's own: they may point anywhere
    else:
        urls = [join_location(location, s.path) for s in manifest.split(split, location).shards]
        if not is_remote(location):
            _check_inside(location, urls)
    if not urls:
        raise FormatError(f"{location}: split {split!r} has no shards")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FormatError(
            f"{len(missing)} shard(s) of split {split!r} are missing, first {missing[0]}: copy the whole dataset "
            "directory written by `python cli.py preprocess`, or re-run it with --resume"
        )
    return urls


def _check_inside(location: str, paths: list[str]) -> None:
    """Refuses a manifest's shard that resolves (symlinks too) to a file outside the dataset folder."""
    root = os.path.realpath(location)
    for path in paths:
        resolved = os.path.realpath(path)
        if os.path.commonpath([root, resolved]) != root:
            raise FormatError(
                f"{os.path.join(location, MANIFEST_NAME)}: shard {os.path.relpath(path, location)} resolves to "
                f"{resolved}, outside the dataset folder {root}: a manifest may only name files inside its folder "
                "(to read shards kept elsewhere, name them with --train-shards/--eval-shards)"
            )


def count_samples(path: str) -> int:
    """The samples of a local shard, from its tar headers alone (up to a broken header or a cut)."""
    count = 0
    with contextlib.suppress(FormatError, OSError):
        for _ in _local_samples(path):
            count += 1
    return count


@dataclass(frozen=True)
class RankPart:
    """What one rank of `world` reads: a subset of the shards and, within it, every `stride`-th sample."""

    urls: list[str]
    stride: int = 1
    offset: int = 0

    def keeps(self, index: int) -> bool:
        return index % self.stride == self.offset


def rank_part(urls: list[str], rank: int, world: int) -> RankPart:
    """Disjoint and complete over ranks: whole shards when there are enough of them, else every world-th sample."""
    if world <= 1:
        return RankPart(list(urls))
    if len(urls) >= world:
        return RankPart(urls[rank::world])
    return RankPart(list(urls), stride=world, offset=rank)


def _octal(field: bytes, what: str) -> int:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not re.fullmatch(rb"[0-7]*", digits):
        raise FormatError(f"its {what} field is not an octal number")
    return int(digits, 8) if digits else 0


def _long_name(record: bytes, kind: bytes) -> str:
    """The name a PAX extended header (`path=` record) or a GNU long-name record gives the next member."""
    if kind == b"L":
        return record.rstrip(b"\0").decode()
    for line in record.decode().splitlines():
        k, _, v = line.partition(" ")[2].partition("=")
        if k == "path":
            return v
    return ""


def iter_tar_members(block: Callable[[int, int], bytes], where: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar; `block(offset, size)` returns those bytes of it.

    A lean parser for the USTAR, PAX and GNU headers shards use, several times faster than `tarfile`. A header
    that is not one (its checksum, an octal field, a size, a name that is not UTF-8) raises FormatError."""
    offset, long_name = 0, ""
    while True:
        header = block(offset, _BLOCK)
        if len(header) < _BLOCK:
            if header:
                raise FormatError(f"{where}: truncated tar header at byte {offset} (the shard was cut short)")
            return
        if header == _ZERO_BLOCK:
            return
        try:
            stored = _octal(header[148:156], "checksum")  # the sum of the header's bytes, its own as spaces
            if stored != sum(header) - sum(header[148:156]) + 256 and stored not in tarfile.calc_chksums(header):
                raise FormatError("its checksum does not match")
            size, kind = _octal(header[124:136], "size"), header[156:157]
            if size > (_MAX_NAME_RECORD if kind in (b"x", b"L") else MAX_MEMBER_BYTES):
                raise FormatError(f"it gives a member of {size:,} bytes")
            data_at = offset + _BLOCK
            if kind in (b"x", b"L"):
                long_name = _long_name(block(data_at, size), kind)
            elif kind in (b"0", b"\0", b"7"):
                name = header[:100].rstrip(b"\0").decode()
                prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
                yield long_name or (f"{prefix}/{name}" if prefix else name), data_at, size
                long_name = ""
        except (FormatError, UnicodeDecodeError) as e:
            why = "a member name that is not UTF-8" if isinstance(e, UnicodeDecodeError) else e
            raise FormatError(f"{where}: broken tar header at byte {offset} ({why})") from None
        offset = data_at + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _group_by_key(members: Iterator[tuple[str, int, int]]) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Consecutive members with one key form a sample: (key, {extension: (offset, size)})."""
    key, group = None, {}
    for name, offset, size in members:
        k, ext = split_member_name(name)
        if k != key:
            if key is not None:
                yield key, group
            key, group = k, {}
        group[ext] = (offset, size)
    if key is not None:
        yield key, group


def _local_samples(path: str) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Maps the file: walking the headers and slicing a member cost no copy (DALI copies what it is fed once)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    for key, group in _group_by_key(iter_tar_members(lambda off, n: view[off : off + n].tobytes(), path)):
        members = {ext: view[offset : offset + size] for ext, (offset, size) in group.items()}
        if any(len(m) != size for m, (_, size) in zip(members.values(), group.values(), strict=True)):
            raise FormatError(f"{path}: sample {key} is cut short (the shard was truncated)")
        yield key, members


def _streamed_samples(url: str, read_timeout: float) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Reads the tar front to back (http, pipe), holding the members of the sample at hand in memory."""
    with open_url(url, read_timeout) as stream:
        pos = 0

        def block(offset: int, size: int) -> bytes:
            nonlocal pos
            while pos < offset:  # padding, or the data of a member that is not kept
                skipped = len(stream.read(min(offset - pos, 1 << 20)))
                if not skipped:
                    return b""
                pos += skipped
            data = stream.read(size)
            pos += len(data)
            return data

        held: dict[int, bytes] = {}

        def members() -> Iterator[tuple[str, int, int]]:
            for name, offset, size in iter_tar_members(block, url):
                held[offset] = block(offset, size)  # now, while the stream is at this member's data
                if len(held[offset]) != size:
                    raise FormatError(f"{url}: member {name} is cut short (the shard was truncated)")
                yield name, offset, size

        for key, group in _group_by_key(members()):
            yield key, {ext: memoryview(held.pop(offset)) for ext, (offset, _) in group.items()}


@dataclass
class SourceStats:
    """What the loader's source did: samples it could not use (counted each time, warned about once, so a run can
    report them at the end), and the frames its clips hold and the frames the decoder must decode for them (for
    the benchmark)."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)
    clip_frames: int = 0
    decoded_frames: int = 0
    _warned: set[str] = field(default_factory=set, repr=False)
    labels: set[int] = field(default_factory=set)  # of the usable samples read

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if where in self._warned:
            return
        self._warned.add(where)
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")
        log.warning("%s: %s; skipped", where, reason)

    @property
    def unusable(self) -> int:
        """How many samples (or shards, read no further) were skipped at least once."""
        return len(self._warned)


@dataclass(eq=False)
class VideoRecord:
    """One video of a shard: its metadata and its media member, a view of the mapped shard (local) or of the bytes
    read (streamed). What was found out about it is kept: which strips were checked, and why it is unusable."""

    key: str
    shard: str
    meta: SampleMeta
    media: memoryview  # the .jpgs or .webm member
    offsets: np.ndarray  # jpeg: strip i is media[offsets[i]:offsets[i + 1]]
    checked: int = 0  # bit i set: strip i is a complete JPEG of the right size (vp9: bit 0, the webm)
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.shard}: sample {self.key}"

    @cached_property
    def array(self) -> np.ndarray:
        """The media member as a uint8 array over the same memory."""
        return np.frombuffer(self.media, np.uint8)


def shard_samples(url: str, read_timeout: float = READ_TIMEOUT) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """The samples of one shard in order, as (key, {extension: member bytes}): mapped (local) or streamed."""
    return _streamed_samples(url, read_timeout) if is_remote(url) else _local_samples(url)


def shard_records(
    url: str, media_ext: str, skip: Callable[[str, str], None], read_timeout: float = READ_TIMEOUT
) -> Iterator[VideoRecord]:
    """The samples of one shard in order. A sample with broken metadata or without its `media_ext` member, or the
    rest of a shard that is cut short, broken or unreadable, is passed to `skip(where, reason)` instead."""
    try:
        for key, members in shard_samples(url, read_timeout):
            try:
                check_key(key)
            except FormatError as e:
                skip(url, str(e))
                continue
            where = f"{url}: sample {key}"
            try:
                if "json" not in members or media_ext not in members:
                    raise FormatError(f"no .{'json' if 'json' not in members else media_ext} member")
                meta = SampleMeta.from_json(members["json"].tobytes(), where)
                offsets = np.asarray(meta.strip_offsets, np.int64)
                if len(offsets) and offsets[-1] != len(members[media_ext]):
                    size = len(members[media_ext])
                    raise FormatError(f"its strips end at byte {offsets[-1]} of a {size}-byte member")
            except FormatError as e:
                skip(where, str(e).removeprefix(f"{where}: "))
                continue
            yield VideoRecord(key, url, meta, members[media_ext], offsets)
    except (FormatError, OSError) as e:
        skip(url, f"shard unreadable from here on: {str(e).removeprefix(f'{url}: ')}")


@dataclass
class _IndexedShard:
    records: list[VideoRecord]
    skipped: list[tuple[str, str]]  # (where, reason) of what could not be read: counted again on every pass


class PartReader:
    """The samples of a rank's part, shard by shard. A local shard is indexed once, the first time it is read (its
    headers walked, its metadata parsed; its strips are checked as they are first used), and served from memory
    after that; a streamed shard is read afresh every time. Samples known to be unusable (`admit` says why) are
    skipped and counted on every pass. `reading` names the shard being read, for the loader's watchdog."""

    def __init__(
        self,
        part: RankPart,
        stats: SourceStats,
        media_ext: str,
        admit: Callable[[VideoRecord], str | None],
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.part, self.stats, self.media_ext, self._admit = part, stats, media_ext, admit
        self.read_timeout = read_timeout
        self._indexed: dict[str, _IndexedShard] = {}
        self.reading: str | None = None  # the shard being read
        self.known_bad: dict[str, str] = {}  # sample key -> why: found by the decoder, skipped from then on

    def records(self, shard_order: Iterable[int] | None = None) -> Iterator[VideoRecord]:
        """The part's usable samples, its shards in `shard_order` (default: as listed)."""
        index = 0
        for i in shard_order if shard_order is not None else range(len(self.part.urls)):
            self.reading = self.part.urls[i]
            for record in self._shard(self.part.urls[i]):
                keep = self.part.keeps(index)
                index += 1
                if not keep:
                    continue
                if record.problem is not None:
                    self.stats.skip(record.where, record.problem)
                    continue
                self.stats.labels.add(record.meta.label)
                yield record
        self.reading = None

    def _shard(self, url: str) -> Iterable[VideoRecord]:
        if is_remote(url):
            return self._admitted(shard_records(url, self.media_ext, self.stats.skip, self.read_timeout))
        if url not in self._indexed:
            skipped: list[tuple[str, str]] = []
            records = self._admitted(shard_records(url, self.media_ext, lambda *where_why: skipped.append(where_why)))
            self._indexed[url] = _IndexedShard(list(records), skipped)
        shard = self._indexed[url]
        for where, reason in shard.skipped:
            self.stats.skip(where, reason)
        return shard.records

    def _admitted(self, records: Iterator[VideoRecord]) -> Iterator[VideoRecord]:
        for record in records:
            record.problem = self._admit(record) or self.known_bad.get(record.key)
            yield record
