"""Atomic writes: a file appears whole or not at all, and is fsync'd with its folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dali_skd.files import open_atomic, write_atomic


def test_write_atomic_replaces_the_file_and_fsyncs_it_and_its_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "new" / "settings.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second" and sorted(p.name for p in path.parent.iterdir()) == ["settings.json"]
    assert synced == ["file", "folder", "file", "folder"]  # the data before the rename, the rename after it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(RuntimeError, match="killed"), open_atomic(path) as f:
        f.write(b"half of the next one")
        raise RuntimeError("killed while saving")
    assert path.read_bytes() == b"the previous checkpoint" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
