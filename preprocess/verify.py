"""`python cli.py preprocess verify OUT`: is every member of every shard still what preprocess wrote?

Shards are copied between disks, machines and object stores, and a damaged strip either stops DALI or decodes to
grey without a word. Every shard the manifest lists is checked, `--workers` at a time (threads: zlib and Pillow
release the GIL): a shard whose whole-file CRC-32 matches the manifest's is intact as a whole; any other one is
read member by member: each `.json` parses and fits the manifest, each `.cls` agrees with it, and each strip (or
webm) matches its CRC-32 and has a sound header. Shards written before checksums get the structural checks and a
full decode of every strip with Pillow instead, which misses some damage (a strip cut short and closed with an end
marker decodes to grey): re-run preprocess to give them checksums.

Nothing is opened before every shard the manifest lists is known to lie inside the dataset folder, by the loader's
rule (`shards.check_inside`), and nothing is written into the dataset: a read-only copy is verified as any other.
Damaged members go to a JSONL report (`--report`, default `./damaged.jsonl`), a line each: shard, key, member and
what is wrong (key and member null for damage outside the members, e.g. in a tar header); the first ten are printed
too. A local shard that was checked before, unchanged since (size and modification time), is not read again: each
finished shard is appended to `<report>.progress.jsonl`, so an interrupted verify resumes, and one run after some
shards were replaced reads only those. A remote shard (http(s), `pipe:`) is streamed and checked afresh every time:
nothing cheap tells that it did not change.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dali_skd.data.checks import admission_problem, strip_problem, video_problem
from dali_skd.data.shards import check_inside, is_remote, join_location, load_manifest, shard_samples
from dali_skd.errors import ConfigError, InputError, RunFailed
from dali_skd.files import check_writable, read_jsonl, write_atomic
from dali_skd.format import STRIPS_EXT, VIDEO_EXT, FormatError, SampleMeta, ShardInfo, ShardManifest

log = logging.getLogger(__name__)

REPORT_NAME = "damaged.jsonl"
SHOWN = 10  # damaged members printed; the report lists them all


@dataclass
class ShardCheck:
    """What checking one shard found; a line of the progress file."""

    path: str  # as the manifest lists it
    samples: int = 0
    strips: int = 0  # jpeg strips (or webm members) checked one by one
    whole_file: bool = False  # its CRC-32 matched the manifest's: no member needed a look
    decoded: bool = False  # written before checksums: its strips were decoded to check them
    damaged: list[dict[str, Any]] = field(default_factory=list)  # report lines
    bytes: int | None = None  # size and modification time of a local shard, to know it unchanged on a rerun
    mtime_ns: int | None = None
    location: str | None = None  # the dataset's folder (resolved) or URL: a rerun reuses only its own shards


@dataclass
class VerifySummary:
    location: str
    report: Path
    shards: list[ShardCheck]
    seconds: float
    reused: set[str] = field(default_factory=set)  # local shards unchanged since an earlier verify: not read again

    @property
    def damaged(self) -> list[dict[str, Any]]:
        return [line for shard in self.shards for line in shard.damaged]

    def format(self) -> str:
        shards, damaged = self.shards, self.damaged
        samples = {(line["shard"], line["key"]) for line in damaged if line["key"] is not None}
        members = {(line["shard"], line["member"]) for line in damaged if line["member"] is not None}
        read = [s for s in shards if s.path not in self.reused]
        lines = [
            f"verified {_count(len(shards), 'shard')} ({_count(sum(s.samples for s in shards), 'sample')}) of "
            f"{self.location} in {self.seconds:.1f} s: {len(read) - sum(s.whole_file for s in read)} read member by "
            f"member ({_count(sum(s.strips for s in read), 'strip or video', 'strips or videos')} checked)"
            + (f", {len(self.reused)} unchanged since the last verify (not read again)" if self.reused else "")
        ]
        old = sum(s.decoded for s in shards)
        if old:
            lines.append(
                f"  {_count(old, 'shard was', 'shards were')} written before checksums: checked by their structure "
                "and a full Pillow decode of each strip, which misses a strip cut short and closed with an end marker; "
                "re-run preprocess (into a new --out) to give them checksums"
            )
        if damaged:
            lines.append(
                f"  {_count(len(damaged), 'problem')}: {_count(len(members), 'damaged member')} of "
                f"{_count(len(samples), 'sample')}, in {_count(len({line['shard'] for line in damaged}), 'shard')}, "
                f"listed in {self.report}; the loader skips them; re-run preprocess for their videos, or copy the "
                "shards again from a sound copy"
            )
            lines += [
                f"    {line['shard']}" + (f": {line['member']}" if line["member"] else "") + f": {line['problem']}"
                for line in damaged[:SHOWN]
            ]
            if len(damaged) > SHOWN:
                lines.append(f"    ... and {len(damaged) - SHOWN} more in {self.report}")
        else:
            lines.append(f"  nothing damaged (report: {self.report})")
        return "\n".join(lines)

    __str__ = format


def _count(n: int, one: str, many: str | None = None) -> str:
    """`1 shard`, `2 shards`: a count and its noun."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def verify_dataset(location: str, workers: int, report: Path | None = None) -> VerifySummary:
    """Check every shard of the dataset at `location` (a folder, http(s) URL prefix or `pipe:` command) and write
    the damaged members to `report` (default: ./damaged.jsonl)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: use 1 or more")
    started = time.perf_counter()
    manifest = load_manifest(location)
    infos = [info for split in manifest.splits.values() for info in split.shards]
    if not is_remote(location):
        check_inside(location, [join_location(location, info.path) for info in infos])
        location_id = os.path.realpath(location)
    else:
        location_id = location
    report = (report or Path(REPORT_NAME)).absolute()
    if report.exists() and not report.is_file():
        raise ConfigError(f"--report {report} exists and is not a file: pass the path of a JSONL file to write")
    check_writable(report.parent, "--report")
    progress = report.with_name(report.name.removesuffix(".jsonl") + ".progress.jsonl")
    done = _finished(progress, location_id)
    results: dict[str, ShardCheck] = {}
    todo = []
    for info in infos:
        reused = done.get(info.path)
        if reused is not None and _unchanged(location, reused):
            results[info.path] = reused
        else:
            todo.append(info)
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(workers) as pool, progress.open("a", encoding="utf-8") as finished:
            futures = [pool.submit(check_shard, location, info, manifest) for info in todo]
            for future in as_completed(futures):
                check = future.result()
                check.location = location_id
                results[check.path] = check
                finished.write(json.dumps(asdict(check), ensure_ascii=False) + "\n")
                finished.flush()
        shards = [results[info.path] for info in infos]
        write_atomic(report, "".join(json.dumps(x, ensure_ascii=False) + "\n" for s in shards for x in s.damaged))
    except OSError as e:
        hint = "pass --report FILE in a folder you can write, with room"
        raise RunFailed(f"cannot write {e.filename or report} ({e.strerror}): {hint}") from e
    return VerifySummary(location, report, shards, time.perf_counter() - started, set(results) - {i.path for i in todo})


def check_shard(location: str, info: ShardInfo, manifest: ShardManifest) -> ShardCheck:
    """Every member of one shard (see the module docstring); the whole file's CRC-32 first, where it is known."""
    url = join_location(location, info.path)
    check = ShardCheck(info.path)
    whole_file_damaged = False
    if not is_remote(url):
        try:
            stat = os.stat(url)
            intact = info.crc32 is not None and stat.st_size == info.bytes and _file_crc32(url) == info.crc32
        except OSError as e:
            check.damaged.append(_line(url, None, None, f"cannot be read ({e.strerror})"))
            return check
        check.bytes, check.mtime_ns = stat.st_size, stat.st_mtime_ns
        if intact:
            check.samples, check.whole_file = info.samples, True
            return check
        whole_file_damaged = info.crc32 is not None

    def damaged(offset: int, why: str) -> None:  # a tar header: the sample it belonged to lacks a member
        check.damaged.append(_line(url, None, None, why))

    try:
        for key, members in shard_samples(url, damaged=damaged):
            check.samples += 1
            problems, checked, decoded = sample_problems(key, members, manifest)
            check.strips += checked
            check.decoded |= decoded
            check.damaged += [_line(url, key, member, problem) for member, problem in problems]
    except (FormatError, OSError) as e:
        reason = str(e).removeprefix(f"{url}: ")
        check.damaged.append(_line(url, None, None, f"unreadable after {check.samples} samples ({reason})"))
        return check
    if check.samples != info.samples:
        check.damaged.append(_line(url, None, None, f"{check.samples} samples, the manifest says {info.samples}"))
    if whole_file_damaged and not check.damaged:
        size = f"{check.bytes} bytes, the manifest says {info.bytes}" if check.bytes != info.bytes else "its CRC-32"
        check.damaged.append(
            _line(url, None, None, f"the file differs from what preprocess wrote ({size}), outside every member")
        )
    return check


def sample_problems(
    key: str, members: dict[str, memoryview], manifest: ShardManifest
) -> tuple[list[tuple[str, str]], int, bool]:
    """(member, what is wrong) of each damaged member of one sample; the strips (or webms) checked; and whether
    they were decoded (a sample written before checksums)."""
    ext = STRIPS_EXT if manifest.format == "jpeg" else VIDEO_EXT
    if "json" not in members:
        return [(f"{key}.json", "missing")], 0, False
    try:
        meta = SampleMeta.from_json(members["json"].tobytes(), key)
    except FormatError as e:
        return [(f"{key}.json", str(e).removeprefix(f"{key}: "))], 0, False
    problems = []
    if misfit := admission_problem(key, meta, manifest):  # the loader's rule: it would skip the sample
        problems.append((f"{key}.json", misfit))
    label = members["cls"].tobytes() if "cls" in members else None
    if label != str(meta.label).encode():
        said = "missing" if label is None else f"says {label[:20]!r}, the .json label {meta.label}"
        problems.append((f"{key}.cls", said))
    media = members.get(ext)
    if media is None:
        return [*problems, (f"{key}.{ext}", "missing")], 0, False
    if misfit:
        return problems, 0, False
    if ext == VIDEO_EXT:
        problem = video_problem(meta, media)
        return problems + ([(f"{key}.{ext}", problem)] if problem else []), 1, False
    offsets = meta.strip_offsets
    if offsets[-1] != len(media):
        end = f"its strips end at byte {offsets[-1]} of a {len(media)}-byte member"
        return [*problems, (f"{key}.{ext}", end)], 0, False
    decode = not meta.strip_crc32
    for strip in range(len(offsets) - 1):
        problem = strip_problem(meta, media, offsets, strip)
        if problem is None and decode:
            problem = _decode_problem(media[offsets[strip] : offsets[strip + 1]], strip)
        if problem:
            problems.append((f"{key}.{ext}", problem))
    return problems, len(offsets) - 1, decode


def _decode_problem(data: memoryview, strip: int) -> str | None:
    """A full decode with Pillow (libjpeg-turbo): for strips without a checksum."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as e:  # a damaged stream raises anything from OSError to SyntaxError
        return f"strip {strip}: does not decode ({e})"
    return None


def _file_crc32(path: str) -> int:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return zlib.crc32(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return zlib.crc32(view)


def _line(shard: str, key: str | None, member: str | None, problem: str) -> dict[str, Any]:
    return {"shard": shard, "key": key, "member": member, "problem": problem}


def _finished(progress: Path, location: str) -> dict[str, ShardCheck]:
    """The shards of `location` an earlier verify finished, by path (a line a kill cut short is cut from the file)."""
    if not progress.is_file():
        return {}
    try:
        checks = read_jsonl(progress, "a checked shard", lambda v: ShardCheck(**v), cut_torn=True)[0]
    except InputError as e:
        log.warning("%s: every shard is checked again", e)
        return {}
    return {check.path: check for check in checks if check.location == location}


def _unchanged(location: str, check: ShardCheck) -> bool:
    """A local shard of the same size and modification time as when it was checked."""
    if is_remote(location) or check.bytes is None:
        return False
    try:
        stat = os.stat(join_location(location, check.path))
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (check.bytes, check.mtime_ns)
