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
from collections.abc import Callable, Container, Iterable, Iterator
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
            check_inside(location, urls)
    if not urls:
        raise FormatError(f"{location}: split {split!r} has no shards")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FormatError(
            f"{len(missing)} shard(s) of split {split!r} are missing, first {missing[0]}: copy the whole dataset "
            "directory written by `python cli.py preprocess`, or re-run it with --resume"
        )
    return urls


def check_inside(location: str, paths: list[str]) -> None:
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


def sample_frames(path: str) -> list[int]:
    """The frames of each sample of a local shard, from its tar headers and each sample's `.json` (0 where that
    does not say), past a damaged header, up to a cut: how many samples it holds, and how long they are."""
    frames: list[int] = []
    with contextlib.suppress(FormatError, OSError):
        for _, members in _local_samples(path):
            try:
                count = json.loads(members["json"].tobytes()).get("frames") if "json" in members else 0
            except (ValueError, AttributeError):
                count = 0
            frames.append(count if type(count) is int else 0)
    return frames


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


def _sound_header(header: bytes) -> bool:
    """A 512-byte block whose checksum matches: a tar header, not member data (whose bytes match by chance about
    never). A damaged header's member is skipped up to the next one."""
    try:
        stored = _octal(header[148:156], "checksum")  # the sum of the header's bytes, its own as spaces
    except FormatError:
        return False
    return header != _ZERO_BLOCK and (
        stored == sum(header) - sum(header[148:156]) + 256 or stored in tarfile.calc_chksums(header)
    )


TarDamage = Callable[[int, str], None]  # (the byte of a damaged header, what was wrong and where reading went on)


def iter_tar_members(
    block: Callable[[int, int], bytes], where: str, damaged: TarDamage
) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar; `block(offset, size)` returns those bytes of it.

    A lean parser for the USTAR, PAX and GNU headers shards use, several times faster than `tarfile`. A damaged
    header costs its own member, not the rest of the tar: one whose size can be trusted (its checksum matches, but
    its name is not UTF-8) is skipped by its size; any other (its checksum, an octal field, a size past any member)
    is skipped up to the next sound header, 512-byte block by block (`_sound_header`). Either way `damaged(offset,
    why)` is told. A tar cut short raises FormatError."""
    offset, long_name, found = 0, "", b""
    while True:
        header, found = found or block(offset, _BLOCK), b""  # a streamed block is read once: the one found is kept
        if len(header) < _BLOCK:
            if header:
                raise FormatError(f"{where}: truncated tar header at byte {offset} (the shard was cut short)")
            return
        if header == _ZERO_BLOCK:
            return
        try:
            if not _sound_header(header):
                _octal(header[148:156], "checksum")
                raise FormatError("its checksum does not match")
            size, kind = _octal(header[124:136], "size"), header[156:157]
            if size > (_MAX_NAME_RECORD if kind in (b"x", b"L") else MAX_MEMBER_BYTES):
                raise FormatError(f"it gives a member of {size:,} bytes")
        except FormatError as e:
            offset, found = _next_sound_header(block, offset, damaged, f"broken tar header at byte {offset} ({e})")
            long_name = ""
            if not found:
                return
            continue
        data_at = offset + _BLOCK
        try:
            if kind in (b"x", b"L"):
                long_name = _long_name(block(data_at, size), kind)
            elif kind in (b"0", b"\0", b"7"):
                name = header[:100].rstrip(b"\0").decode()
                prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
                yield long_name or (f"{prefix}/{name}" if prefix else name), data_at, size
                long_name = ""
        except UnicodeDecodeError:
            damaged(offset, f"broken tar header at byte {offset} (a member name that is not UTF-8): its member skipped")
            long_name = ""
        offset = data_at + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _next_sound_header(
    block: Callable[[int, int], bytes], broken: int, damaged: TarDamage, why: str
) -> tuple[int, bytes]:
    """The offset and bytes of the first sound header after the broken one at `broken` (no bytes at the end of the
    tar); says which to `damaged`."""
    offset = broken + _BLOCK
    while len(header := block(offset, _BLOCK)) == _BLOCK:
        if _sound_header(header):
            damaged(broken, f"{why}: read on from the next sound header, at byte {offset}")
            return offset, header
        offset += _BLOCK
    damaged(broken, f"{why}: no sound header after it, the rest of the shard is lost")
    return offset, b""


def _group_by_key(members: Iterator[tuple[str, int, int]]) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Consecutive members with one key form a sample: (key, {extension: (offset, size)}). The sample being
    gathered when the tar turns out cut short is still given, with the members it has."""
    key, group = None, {}
    try:
        for name, offset, size in members:
            k, ext = split_member_name(name)
            if k != key:
                if key is not None:
                    yield key, group
                key, group = k, {}
            group[ext] = (offset, size)
    except (FormatError, OSError):
        if key is not None:
            yield key, group
        raise
    if key is not None:
        yield key, group


def _ignore_damage(offset: int, why: str) -> None:
    pass


def _local_samples(path: str, damaged: TarDamage = _ignore_damage) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Maps the file: walking the headers and slicing a member cost no copy (DALI copies what it is fed once)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    for key, group in _group_by_key(iter_tar_members(lambda off, n: view[off : off + n].tobytes(), path, damaged)):
        members = {ext: view[offset : offset + size] for ext, (offset, size) in group.items()}
        whole = {ext: member for ext, member in members.items() if len(member) == group[ext][1]}
        yield key, whole
        if len(whole) < len(members):  # given without the member cut short: a reader finds it missing
            raise FormatError(f"{path}: sample {key} is cut short (the shard was truncated)")


def _streamed_samples(
    url: str, read_timeout: float, damaged: TarDamage = _ignore_damage
) -> Iterator[tuple[str, dict[str, memoryview]]]:
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
            for name, offset, size in iter_tar_members(block, url, damaged):
                held[offset] = block(offset, size)  # now, while the stream is at this member's data
                if len(held[offset]) != size:
                    raise FormatError(f"{url}: member {name} is cut short (the shard was truncated)")
                yield name, offset, size

        for key, group in _group_by_key(members()):
            yield key, {ext: memoryview(held.pop(offset)) for ext, (offset, _) in group.items()}


@dataclass
class SourceStats:
    """What the loader's source did: the samples it could not use, each counted once a pass over the shards (an
    epoch is one pass) and named once in the log, so that every line of a run counts each one once; and the frames
    its clips hold and the frames the decoder must decode for them (for the benchmark).

    What is skipped is named by where it is: a sample (`shard: sample KEY`), or the unread rest of a shard (the
    shard), which counts as the samples it held past the cut."""

    skipped: int = 0  # samples skipped, counted once in every pass that met them
    examples: list[str] = field(default_factory=list)
    clip_frames: int = 0
    decoded_frames: int = 0
    labels: set[int] = field(default_factory=set)  # of the usable samples read
    _this_pass: dict[str, int] = field(default_factory=dict, repr=False)  # where -> samples, in the current pass
    _ever: dict[str, int] = field(default_factory=dict, repr=False)  # where -> samples, over the run

    def start_pass(self) -> None:
        self._this_pass.clear()

    def skip(self, where: str, reason: str, samples: int = 1) -> None:
        """`samples` at `where` could not be used (0: damage that cost none, e.g. a tar header of a member the
        loader does not read), for `reason`."""
        if where in self._this_pass:
            return
        self._this_pass[where] = samples
        self.skipped += samples
        if where in self._ever:
            self._ever[where] = max(self._ever[where], samples)
            return
        self._ever[where] = samples
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")
        log.warning("%s: %s%s", where, reason, "; skipped" if samples else "")

    @property
    def unusable(self) -> int:
        """How many distinct samples were skipped at least once."""
        return sum(self._ever.values())


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


@dataclass(frozen=True)
class Lost:
    """Samples of a shard that could not be read, where and why: a sample, the rest of a shard, or none (damage that
    cost no sample: a tar header of a member a reader does not need)."""

    where: str
    reason: str
    samples: int = 1


def shard_samples(
    url: str, read_timeout: float = READ_TIMEOUT, damaged: TarDamage = _ignore_damage
) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """The samples of one shard in order, as (key, {extension: member bytes}): mapped (local) or streamed. A damaged
    tar header is passed to `damaged(offset, why)`: the sample it belonged to lacks a member."""
    return _streamed_samples(url, read_timeout, damaged) if is_remote(url) else _local_samples(url, damaged)


def shard_records(
    url: str, media_ext: str, read_timeout: float = READ_TIMEOUT, expected: int | None = None
) -> Iterator[VideoRecord | Lost]:
    """The samples of one shard in order, and in their place what could not be read: a sample with broken metadata
    or without its `media_ext` member, a damaged tar header (which costs no sample of its own), and the rest of a
    shard that is cut short, broken or unreadable, as many samples as it held past the cut (of the `expected`, where
    known; else one)."""
    damage: list[Lost] = []
    seen = 0
    try:
        for key, members in shard_samples(
            url, read_timeout, lambda at, why: damage.append(Lost(f"{url}: byte {at}", why, 0))
        ):
            yield from damage
            damage.clear()
            seen += 1
            try:
                check_key(key)
            except FormatError as e:
                yield Lost(f"{url}: sample {key[:40]!r}", str(e))
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
                yield Lost(where, str(e).removeprefix(f"{where}: "))
                continue
            yield VideoRecord(key, url, meta, members[media_ext], offsets)
    except (FormatError, OSError) as e:
        yield from damage
        rest = max(0, expected - seen) if expected is not None else 1
        yield Lost(url, f"shard unreadable from here on: {str(e).removeprefix(f'{url}: ')}", rest)
        return
    yield from damage
    if expected is not None and seen < expected:  # a damaged header with no sound one after it
        yield Lost(url, f"the shard ends after {seen} of its {expected} samples", expected - seen)


class PartReader:
    """The samples of a rank's part (only those whose keys `keys` holds, when given), shard by shard. A local shard
    is indexed once, the first time it is read (its headers walked, its metadata parsed; its strips are checked as
    they are first used), and served from memory after that; a streamed shard is read afresh every time. Samples
    known to be unusable (`admit` says why) are skipped and counted on every pass. `reading` names the shard being
    read, for the loader's watchdog; `expected` holds the samples of the shards whose count is known, to count what
    a shard cut short lost."""

    def __init__(
        self,
        part: RankPart,
        stats: SourceStats,
        media_ext: str,
        admit: Callable[[VideoRecord], str | None],
        read_timeout: float = READ_TIMEOUT,
        expected: dict[str, int] | None = None,
        keys: Container[str] | None = None,
    ) -> None:
        self.part, self.stats, self.media_ext, self._admit = part, stats, media_ext, admit
        self.read_timeout, self.expected = read_timeout, expected or {}
        self.keys = keys  # read only the samples whose keys it holds (a part of the split: `holdout.Subset`)
        self._indexed: dict[str, list[VideoRecord | Lost]] = {}
        self.reading: str | None = None  # the shard being read
        self.known_bad: dict[str, str] = {}  # sample key -> why: found by the decoder, skipped from then on

    def records(self, shard_order: Iterable[int] | None = None) -> Iterator[VideoRecord]:
        """One pass: the part's usable samples, its shards in `shard_order` (default: as listed)."""
        self.stats.start_pass()
        index = 0  # of the sample in the shards read: what ranks splitting shards by sample take turns on
        for i in shard_order if shard_order is not None else range(len(self.part.urls)):
            self.reading = self.part.urls[i]
            for item in self._shard(self.part.urls[i]):
                if isinstance(item, Lost):
                    mine = sum(map(self.part.keeps, range(index, index + item.samples)))
                    index += item.samples
                    if mine or not item.samples:
                        self.stats.skip(item.where, item.reason, mine)
                    continue
                if self.keys is not None and item.key not in self.keys:
                    continue  # before the ranks' count: they split the subset's samples among them
                keep = self.part.keeps(index)
                index += 1
                if not keep:
                    continue
                if item.problem is not None:
                    self.stats.skip(item.where, item.problem)
                    continue
                self.stats.labels.add(item.meta.label)
                yield item
        self.reading = None

    def _shard(self, url: str) -> Iterable[VideoRecord | Lost]:
        expected = self.expected.get(url)
        if is_remote(url):
            return self._admitted(shard_records(url, self.media_ext, self.read_timeout, expected))
        if url not in self._indexed:
            self._indexed[url] = list(self._admitted(shard_records(url, self.media_ext, expected=expected)))
        return self._indexed[url]

    def _admitted(self, items: Iterator[VideoRecord | Lost]) -> Iterator[VideoRecord | Lost]:
        for item in items:
            if isinstance(item, VideoRecord):
                item.problem = self._admit(item) or self.known_bad.get(item.key)
            yield item
