"""Writing a file so that it appears whole or not at all, and stays after a crash: checkpoints, manifests, shards,
the journal's settings, the synthetic set's small files and a run's config all go through `AtomicFile`.

The data goes to `<name>.tmp` in the same folder (a rename within one file system is atomic), is flushed and
fsync'd, renamed over `<name>`, and the folder is fsync'd so that the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class AtomicFile:
    """`path` being written: write to `file`, then `commit` (or `discard`). Its folder is created if need be."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file: BinaryIO = self.tmp.open("wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def open_atomic(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends, and is discarded if the block raises."""
    out = AtomicFile(path)
    try:
        yield out.file
    except BaseException:
        out.discard()
        raise
    out.commit()


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`data` (text is written as UTF-8) as the whole of `path`."""
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable: a crash after it must not bring the old name back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
