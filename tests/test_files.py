"""Atomic writes: a file appears whole or not at all, and is fsync'd with its folder; a full disk is named; one
process writes into a folder at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import lock_held_elsewhere

from dali_skd.checkpoint import save_checkpoint
from dali_skd.errors import InputError
from dali_skd.files import (
    DirectoryBusy,
    DiskFull,
    append_line,
    lock_directory,
    open_atomic,
    read_jsonl,
    write_atomic,
)


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


# --- a full disk: /dev/full refuses every write with ENOSPC, as a full file system does ----------------------------

needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@needs_dev_full
def test_a_full_disk_names_the_checkpoint_and_leaves_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(10)})
    before = path.read_bytes()
    (tmp_path / "last.pt.tmp").symlink_to("/dev/full")  # where the next one is written
    with pytest.raises(DiskFull, match=rf"cannot write {path}: the disk is full \(No space left on device\)\. Free"):
        save_checkpoint(path, {"epoch": 2, "weights": torch.ones(100_000)})  # torch.save would say 'unexpected pos'
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@needs_dev_full
def test_a_full_disk_names_a_shard_and_a_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "shard-000000.tar.tmp").symlink_to("/dev/full")
    with pytest.raises(DiskFull, match=r"cannot write .*shard-000000\.tar: the disk is full"):
        write_atomic(tmp_path / "shard-000000.tar", b"x" * 100_000)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(DiskFull, match=r"cannot write .*metrics\.jsonl: the disk is full.*--resume"):
        append_line(tmp_path / "metrics.jsonl", '{"epoch": 3}')


# --- one writer per folder -----------------------------------------------------------------------------------------


def test_a_locked_folder_is_refused_naming_its_holder_and_freed_when_the_holder_dies(tmp_path: Path) -> None:
    with lock_held_elsewhere(tmp_path) as holder:
        busy = rf"{tmp_path} is in use by host .*, pid {holder.pid} \(lock {tmp_path / '.lock'}\): wait"
        with pytest.raises(DirectoryBusy, match=busy), lock_directory(tmp_path):
            pass
    # the holder was SIGKILLed: nothing of it ran, and the kernel dropped its lock
    with lock_directory(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_a_waiting_lock_is_taken_once_the_holder_is_gone(tmp_path: Path) -> None:
    with lock_held_elsewhere(tmp_path, "set.lock") as holder:
        threading.Timer(0.5, holder.kill).start()
        started = time.monotonic()
        with lock_directory(tmp_path, "set.lock", wait=True):
            assert time.monotonic() - started >= 0.4 and holder.poll() is not None
            assert f"pid {os.getpid()}" in (tmp_path / "set.lock").read_text()


def test_a_file_system_without_locks_is_said_and_not_fatal(tmp_path: Path, monkeypatch, caplog) -> None:
    def no_locks(*_) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with lock_directory(tmp_path):
        pass
    assert "this file system has no locks" in caplog.text


@pytest.mark.parametrize(
    ("text", "torn"),
    [
        ('{"a": 1}\n{"a": 2}\n', None),
        ('{"a": 1}\n{"a": 2}\n\n', None),  # blank lines are no records
        ('{"a": 1}\n{"a": 2}\n{"a": 3', '{"a": 3'),  # a kill in the middle of an append
        ('{"a": 1}\n{"a": 2}\n{"a": 3}', '{"a": 3}'),  # ... just before its newline: the next append would join it
        ('{"a": 1}\n{"a": 2}\n{"a": ', '{"a": '),
        ('{"a": 1}\n{"a": 2}\n{"b": 3}\n', '{"b": 3}'),  # not a record: the last line, cut and ended by hand
    ],
)
def test_read_jsonl_leaves_out_a_last_line_cut_short(tmp_path: Path, text: str, torn: str | None) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(text)

    def parse(value: object) -> int:
        if not isinstance(value, dict) or "a" not in value:
            raise ValueError("no a")
        return value["a"]

    assert read_jsonl(path, "a record", parse) == ([1, 2], torn)
    assert path.read_text() == text  # read, not changed
    read_jsonl(path, "a record", parse, cut_torn=True)
    assert path.read_text() == (text if torn is None else '{"a": 1}\n{"a": 2}\n')  # the next append starts a line
    append_line(path, '{"a": 4}')
    assert read_jsonl(path, "a record", parse) == ([1, 2, 4], None)


def test_read_jsonl_names_a_damaged_line_that_is_not_the_last(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(InputError, match=r'records.jsonl, line 2 is not a record \(Expecting value: .*\): \'{"a": \''):
        read_jsonl(path, "a record")
