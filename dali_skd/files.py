"""Writing a file so that it appears whole or not at all, and stays after a crash: checkpoints, manifests, shards,
the journal's settings, the synthetic set's small files and a run's config all go through `AtomicFile`.

The data goes to `<name>.tmp` in the same folder (a rename within one file system is atomic), is flushed and
fsync'd, renamed over `<name>`, and the folder is fsync'd so that the rename itself survives a power cut. A full
disk (or quota) while writing is `DiskFull`, naming the file; the file it would have replaced is left as it was.

`lock_directory`: one process writes into an output folder at a time (a kernel lock, gone with its process).
`check_writable`: an output folder that cannot be written (a read-only mount, an immutable folder) is said at once,
before the work whose results would go there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from dali_skd.errors import DaliSkdError, InputError

log = logging.getLogger(__name__)

FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
REFUSED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}  # a folder or file this process may not write (or read)
T = TypeVar("T")


class DiskFull(DaliSkdError, RuntimeError):
    """No space (or no quota) left while writing `path`."""

    def __init__(self, path: str | Path, cause: OSError) -> None:
        self.path = Path(path)
        what = "the disk quota is exceeded" if cause.errno == errno.EDQUOT else "the disk is full"
        super().__init__(
            f"cannot write {self.path}: {what} ({cause.strerror}). Free some space there, then run the command "
            f"again with --resume: what {self.path.name} held before this write is intact"
        )


class _FullDiskNamed(io.FileIO):
    """The temporary file of `path`: a write that finds the disk full raises `DiskFull` naming `path`, and keeps
    it (`torch.save` turns the errors of its writes into its own RuntimeError, which says nothing of a disk)."""

    def __init__(self, tmp: Path, path: Path) -> None:
        super().__init__(tmp, "w")
        self.path = path
        self.full: DiskFull | None = None

    def write(self, data) -> int:  # type: ignore[override]
        try:
            return super().write(data)
        except OSError as e:
            if e.errno not in FULL_DISK_ERRNOS:
                raise
            self.full = self.full or DiskFull(self.path, e)
            raise self.full from e


class AtomicFile:
    """`path` being written: write to `file`, then `commit` (or `discard`). Its folder is created if need be."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = _FullDiskNamed(self.tmp, self.path)
        self.file: BinaryIO = io.BufferedWriter(self._raw)  # type: ignore[assignment]

    @property
    def full_disk(self) -> DiskFull | None:
        """Set once a write found the disk full."""
        return self._raw.full

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # a network file system may report a full disk only here
            self.file.close()
        except OSError as e:
            self.discard()
            if e.errno in FULL_DISK_ERRNOS:
                raise DiskFull(self.path, e) from e
            raise
        except DiskFull:
            self.discard()
            raise
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        try:
            self.file.close()
        except (OSError, DiskFull):  # flushing what the full disk refused fails again: the file goes anyway
            self._raw.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def open_atomic(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends, and is discarded if the block raises."""
    out = AtomicFile(path)
    try:
        yield out.file
    except BaseException as e:
        out.discard()
        if out.full_disk is not None and out.full_disk is not e:  # e.g. torch.save's RuntimeError about it
            raise out.full_disk from e
        raise
    out.commit()


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`data` (text is written as UTF-8) as the whole of `path`."""
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def append_line(path: str | Path, line: str) -> None:
    """Appends `line` and a newline to `path`, fsync'd. A full disk leaves the file as it was (no torn line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = memoryview(line.encode() + b"\n")
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as e:
            if e.errno not in FULL_DISK_ERRNOS:
                raise
            with contextlib.suppress(OSError):  # frees space, cannot fail for want of it (a device file: no matter)
                os.ftruncate(fd, size)
            raise DiskFull(path, e) from e
    finally:
        os.close(fd)


def check_writable(folder: str | Path, flag: str) -> None:
    """Fails at once, naming `folder` (given with `flag`) and why, if no file can be created in it; creates it if
    need be. A file is made and removed again, where its permission bits alone would not tell: a read-only mount
    (EROFS), an immutable folder (EPERM even for root), a network file system's own rules."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dali-skd-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in FULL_DISK_ERRNOS:
            raise DiskFull(folder, e) from e
        raise NotWritable(
            f"{flag} {folder}: cannot write there ({e.strerror}): choose a folder you can write, or make it writable"
        ) from e


class NotWritable(DaliSkdError, RuntimeError):
    """A folder this process may not write in (a read-only mount, an immutable folder, its permissions)."""


def read_jsonl(
    path: str | Path, what: str, parse: Callable[[Any], T] = lambda value: value, cut_torn: bool = False
) -> tuple[list[T], str | None]:
    """The records of a JSON-lines file written by appending (`append_line`), each `parse`d (its ValueError or
    TypeError: not such a record), and its last line if a kill or a full disk cut it short, left out for the caller
    to name: one that no newline ends, or that is not a record. `cut_torn` also cuts that line from the file, so
    that the next append starts a line of its own. Any other line that is not `what` raises InputError."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.decode(errors="replace").split("\n")  # the last item: what follows the last newline
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, torn = [], None
    for number, line in enumerate(lines[: last + 1], start=1):
        if not line.strip():
            continue
        try:
            if number == len(lines):
                raise ValueError("no newline ends it")
            records.append(parse(json.loads(line)))
        except (ValueError, TypeError) as e:
            if number != last + 1:
                raise InputError(f"{path}, line {number} is not {what} ({e}): {line[:80]!r}") from e
            torn = line
    if torn is not None and cut_torn:
        with path.open("r+b") as f:
            f.truncate(data.rstrip().rfind(b"\n") + 1)
    return records, torn


class DirectoryBusy(DaliSkdError, RuntimeError):
    """Another process holds the lock of an output folder."""


@contextmanager
def lock_directory(directory: str | Path, name: str = ".lock", wait: bool = False) -> Iterator[None]:
    """Holds an exclusive `flock` on `directory/name` (created with the folder) while the block runs; it is
    released when the process ends, however it ends, so a crash leaves nothing to clean up. The file names the
    holder (host, PID, SLURM job) for the message of a second process, which raises `DirectoryBusy` at once, or
    with `wait` waits for its turn (`--part` runs that share the synthetic set's folder: one of them makes it).
    On a file system without locks (Lustre mounted without `flock`) it warns and goes on unlocked. `directory` is
    a command's --out: one that cannot be written is said first (`check_writable`)."""
    check_writable(directory, "--out")
    path = Path(directory) / name
    with path.open("a+") as f:  # not truncated before the lock is ours: it names the holder
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise DirectoryBusy(
                f"{directory} is in use by {holder} (lock {path}): wait for that run to end or stop it, or "
                "choose another output folder"
            ) from None
        except OSError as e:
            log.warning(
                "cannot lock %s (%s): this file system has no locks, so a second run into %s would not be stopped",
                path, e.strerror, directory,
            )  # fmt: skip
        job = os.environ.get("SLURM_JOB_ID")
        f.truncate(0)
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}" + (f", SLURM job {job}" if job else "") + "\n")
        f.flush()
        yield


def check_not_in_use(directory: str | Path) -> None:
    """Fails at once (`DirectoryBusy`) if another process holds `directory`'s lock, before the seconds a run takes
    to import torch; the run takes the lock itself later (under torchrun, rank 0 checks and locks)."""
    if os.environ.get("RANK", "0") == "0":
        with lock_directory(directory):
            pass


def _fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable: a crash after it must not bring the old name back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
