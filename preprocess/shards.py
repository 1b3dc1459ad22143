"""Shards, their journal, the manifest, and merging `--part` runs: how a run survives being killed at any moment.

A shard is written as `<name>.tar.tmp`, fsync'd and renamed to `<name>.tar`; only then is it recorded in its
split's journal (`OUT/.journal/<split>[.part-I-of-N].jsonl`: one fsync'd line per finished shard with the range of
the split's videos it consumed, failures included, and its counts). A resumed run deletes whatever the journal
does not name (a `.tmp`, a shard renamed just before the kill) and goes on after the last journaled video, so it
ends with the same shards, byte for byte, as a run never killed. failed.jsonl and the manifest are written from
the journals at the end, so nothing in them is counted twice.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from dali_skd.config import changed_settings, format_changes
from dali_skd.files import AtomicFile, append_line, write_atomic
from dali_skd.format import FAILED_NAME, MANIFEST_NAME, SHORT_VIDEO_FRAMES, ShardInfo, ShardManifest, SplitInfo
from preprocess.datasets import PreprocessError

JOURNAL_DIR = ".journal"
SETTINGS_NAME = "settings.json"
_PART_MANIFEST = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")
T = TypeVar("T", int, float)


@dataclass(frozen=True)
class Part:
    """`--part I/N`: the I-th (from 1) of N contiguous ranges of every split's fixed order."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Part | None:
        if text is None:
            return None
        index, slash, count = text.partition("/")
        if not (slash and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
            raise PreprocessError(f"--part {text!r}: write I/N with 1 <= I <= N, e.g. --part 1/4 ... --part 4/4")
        return cls(int(index), int(count))

    @property
    def suffix(self) -> str:
        return f".part-{self.index}-of-{self.count}"

    def range(self, videos: int) -> tuple[int, int]:
        return videos * (self.index - 1) // self.count, videos * self.index // self.count


def run_file(name: str, part: Part | None) -> str:
    """The name a run writes for `name`: `manifest.json` is `manifest.part-2-of-4.json` for part 2/4."""
    stem, dot, extension = name.partition(".")
    return f"{stem}{part.suffix if part else ''}{dot}{extension}"


def shard_prefix(part: Part | None) -> str:
    """`shard-`, or `shard-p02of04-` for part 2/4: parts never write each other's (or a single run's) shards."""
    return f"shard-p{part.index:02d}of{part.count:02d}-" if part else "shard-"


def shard_pattern(part: Part | None) -> re.Pattern[str]:
    """The names of a run's shards, finished or not."""
    return re.compile(re.escape(shard_prefix(part)) + r"\d{6}\.tar(\.tmp)?")


def shard_name(part: Part | None, number: int) -> str:
    return f"{shard_prefix(part)}{number:06d}.tar"


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends only on the name and size: the same input gives byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def members_tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """What `members` add to a tar: a header block each, data padded to whole blocks."""
    return sum(tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for _, data in members)


def tar_file_bytes(members_bytes: int) -> int:
    """The size of a finished tar: its members, two zero blocks, padded to whole records (as `tarfile` writes)."""
    return -(-(members_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _Checksummed:
    """A file being written, and the CRC-32 of what was written so far (no second read of the shard)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file, self.crc32 = file, 0

    def write(self, data: bytes) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()


class ShardWriter:
    """One shard being written to `<path>.tmp`; `finish` makes it durable under its final name. The CRC-32 of the
    whole file (`crc32`) is computed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = AtomicFile(path)
        self._out = _Checksummed(self._file.file)
        self._tar = tarfile.TarFile(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.members_bytes = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self._tar.addfile(member_info(name, len(data)), io.BytesIO(data))
        self.samples += 1
        self.members_bytes += members_tar_bytes(members)

    def finish(self) -> int:
        self._tar.close()
        self._file.commit()
        return self.path.stat().st_size

    @property
    def crc32(self) -> int:
        return self._out.crc32


@dataclass
class ShardRecord:
    """One journal line: a finished shard and the videos [start, end) of the split it consumed."""

    shard: str | None  # path relative to OUT; None when the split's last videos all failed
    start: int
    end: int
    samples: int = 0
    bytes: int = 0
    frames: int = 0
    short_videos: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)  # failed.jsonl lines
    crc32: int | None = None  # of the shard file (None in journals written before checksums)
    seconds: float | None = None  # of video stored (None in journals written before the cost report)
    source_bytes: int | None = None  # of the stored videos' source files (likewise)


class Journal:
    """The append-only list of a split's finished shards (of one part), `OUT/.journal/<split>[.part-I-of-N].jsonl`."""

    def __init__(self, out: Path, split: str, part: Part | None) -> None:
        self.path = out / JOURNAL_DIR / run_file(f"{split}.jsonl", part)
        self.records = self._read()

    def _read(self) -> list[ShardRecord]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # killed in the middle of an append: that shard was never journaled
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        try:
            return [ShardRecord(**json.loads(line)) for line in complete.decode().splitlines()]
        except (ValueError, TypeError) as e:
            raise PreprocessError(f"{self.path} is damaged ({e}): start again into a new --out") from e

    def append(self, record: ShardRecord) -> None:
        append_line(self.path, json.dumps(asdict(record), ensure_ascii=False))
        self.records.append(record)

    @property
    def next_video(self) -> int | None:
        return self.records[-1].end if self.records else None

    def split_info(self) -> SplitInfo:
        shards = [ShardInfo(r.shard, r.samples, r.bytes, r.crc32) for r in self.records if r.shard is not None]
        return SplitInfo(
            samples=sum(r.samples for r in self.records),
            frames=sum(r.frames for r in self.records),
            short_videos=sum(r.short_videos for r in self.records),
            shards=shards,
            seconds=known_sum(r.seconds for r in self.records),
            source_bytes=known_sum(r.source_bytes for r in self.records),
        )

    def failures(self) -> list[dict[str, str]]:
        return [failure for record in self.records for failure in record.failures]


def known_sum(values: Iterable[T | None]) -> T | None:
    """The sum of `values`, or None if any is None (a count that records written before it lack)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)  # type: ignore[return-value]


class SplitWriter:
    """Packs one split's samples, arriving in the split's order, into shards of at most `shard_bytes` (a shard holds
    at least one sample), journaling each finished shard with the videos it consumed."""

    def __init__(self, out: Path, split: str, part: Part | None, start: int, end: int, shard_bytes: int) -> None:
        self.out, self.split, self.part, self.end, self.shard_bytes = out, split, part, end, shard_bytes
        self.journal = Journal(out, split, part)
        self.next_video = self.journal.next_video if self.journal.next_video is not None else start
        self._shard_number = sum(1 for r in self.journal.records if r.shard is not None)
        self._shard: ShardWriter | None = None
        self._record = self._new_record(self.next_video)
        self._remove_unjournaled()

    def _remove_unjournaled(self) -> None:
        journaled = {r.shard for r in self.journal.records}
        pattern = shard_pattern(self.part)
        for path in sorted((self.out / self.split).glob("*")):
            if pattern.fullmatch(path.name) and f"{self.split}/{path.name}" not in journaled:
                path.unlink()

    @staticmethod
    def _new_record(start: int) -> ShardRecord:
        return ShardRecord(None, start, start, seconds=0.0, source_bytes=0)

    def add_sample(
        self, index: int, members: list[tuple[str, bytes]], frames: int, seconds: float, source_bytes: int
    ) -> None:
        """Add a video's members: `frames` stored, `seconds` long, from a source file of `source_bytes`."""
        self._check_order(index)
        members_bytes = members_tar_bytes(members)
        if self._shard is not None and tar_file_bytes(self._shard.members_bytes + members_bytes) > self.shard_bytes:
            self._close(index)
        if self._shard is None:
            (self.out / self.split).mkdir(parents=True, exist_ok=True)
            self._shard = ShardWriter(self.out / self.split / shard_name(self.part, self._shard_number))
        self._shard.add(members)
        record = self._record
        record.frames += frames
        record.short_videos += frames < SHORT_VIDEO_FRAMES
        record.seconds = (record.seconds or 0.0) + seconds
        record.source_bytes = (record.source_bytes or 0) + source_bytes
        self.next_video = index + 1

    def add_failure(self, index: int, failure: dict[str, str]) -> None:
        self._check_order(index)
        self._record.failures.append(failure)
        self.next_video = index + 1

    def finish(self) -> None:
        """Journal what is left once the split's last video has been added."""
        if self._shard is not None or self._record.failures:
            self._close(self.end)

    def _check_order(self, index: int) -> None:
        if index != self.next_video:
            raise RuntimeError(f"{self.split}: video {index} arrived, {self.next_video} expected")

    def _close(self, end: int) -> None:
        record = self._record
        record.end = end
        if self._shard is not None:
            record.samples = self._shard.samples
            record.bytes = self._shard.finish()
            record.crc32 = self._shard.crc32
            record.shard = f"{self.split}/{self._shard.path.name}"
            self._shard_number += 1
        self.journal.append(record)
        self._shard = None
        self._record = self._new_record(end)


def check_settings(out: Path, part: Part | None, settings: dict[str, Any]) -> None:
    """Record the run's settings, or check that a resumed run's are the interrupted run's."""
    path = out / JOURNAL_DIR / run_file(SETTINGS_NAME, part)
    settings = json.loads(json.dumps(settings))  # compare as they read back
    if not path.is_file():
        write_atomic(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        return
    changes = changed_settings(json.loads(path.read_text(encoding="utf-8")), settings)
    if changes:
        raise PreprocessError(
            f"{out} was written with other settings or videos ({format_changes(changes)}): resume with the flags "
            "and videos of the interrupted run, or start again into a new --out"
        )


def write_results(out: Path, part: Part | None, manifest: ShardManifest, failures: list[dict[str, str]]) -> Path:
    """Write the failed list, then the manifest (its presence says the run finished); return the manifest's path."""
    lines = "".join(json.dumps(failure, ensure_ascii=False) + "\n" for failure in failures)
    write_atomic(out / run_file(FAILED_NAME, part), lines)
    return manifest.save(out, run_file(MANIFEST_NAME, part))


def merge_parts(out: Path) -> ShardManifest:
    """Combine the finished `--part I/N` runs in `out` into `manifest.json` and `failed.jsonl`, in the order a
    single run lists them (split by split, parts in order). The parts must agree on every setting and on the
    videos they were given, as their journals' settings files record."""
    out = Path(out)
    found = {
        (int(m[1]), int(m[2])): path
        for path in out.glob("manifest.part-*.json")
        if (m := _PART_MANIFEST.fullmatch(path.name))
    }
    counts = sorted({count for _, count in found})
    if not counts:
        raise PreprocessError(
            f"no manifest.part-I-of-N.json in {out}: run `python cli.py preprocess ... --out {out} --part I/N` "
            "for every I first"
        )
    if len(counts) > 1:
        raise PreprocessError(f"{out} holds parts of {' and '.join(map(str, counts))} runs: keep the parts of one N")
    count = counts[0]
    missing = [index for index in range(1, count + 1) if (index, count) not in found]
    if missing:
        names = ", ".join(f"manifest.part-{index}-of-{count}.json" for index in missing)
        raise PreprocessError(
            f"{out} lacks {names}: finish (or --resume) part{'s' * (len(missing) > 1)} "
            f"{', '.join(f'{index}/{count}' for index in missing)} first"
        )
    parts = [Part(index, count) for index in range(1, count + 1)]
    _check_parts_agree(out, parts)
    manifests = [
        ShardManifest.from_dict(json.loads(found[(p.index, count)].read_text()), str(found[(p.index, count)]))
        for p in parts
    ]
    failures = [_read_failures(out / run_file(FAILED_NAME, part)) for part in parts]
    splits = {}
    for split in manifests[0].splits:
        infos = [manifest.split(split, out) for manifest in manifests]
        splits[split] = SplitInfo(
            samples=sum(info.samples for info in infos),
            frames=sum(info.frames for info in infos),
            short_videos=sum(info.short_videos for info in infos),
            shards=[shard for info in infos for shard in info.shards],
            seconds=known_sum(info.seconds for info in infos),
            source_bytes=known_sum(info.source_bytes for info in infos),
        )
    merged = replace(manifests[0], splits=splits, failures=sum(manifest.failures for manifest in manifests))
    ordered = [failure for split in splits for part in failures for failure in part if failure["split"] == split]
    write_results(out, None, merged, ordered)
    return merged


def _check_parts_agree(out: Path, parts: list[Part]) -> None:
    """Same flags, same classes, same videos: otherwise the parts' ranges do not tile one run's order."""
    recorded = []
    for part in parts:
        path = out / JOURNAL_DIR / run_file(SETTINGS_NAME, part)
        if not path.is_file():
            raise PreprocessError(f"{path} is missing: merge needs every part's {JOURNAL_DIR}/ folder in {out}")
        recorded.append(json.loads(path.read_text(encoding="utf-8")))
    for part, settings in zip(parts[1:], recorded[1:], strict=True):
        differ = [name for name in changed_settings(recorded[0], settings) if name != "part"]
        if differ:
            raise PreprocessError(
                f"part {part.index}/{part.count} differs from part 1/{part.count} in {', '.join(differ)}: "
                "run every part with the same flags on the same videos"
            )


def _read_failures(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise PreprocessError(f"{path} is missing: that part did not finish; --resume it, then merge again")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
