"""Atomic writes: a file appears whole or not at all, and is fsync'd with its folder; a full disk is named; one
process writes into a folder at a time."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import lock_held_elsewhere, read_only, write_checkpoint

from dali_skd.checkpoint import save_checkpoint
from dali_skd.config import ClipConfig, TrainConfig
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
from preprocess.shards import ShardWriter


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


@needs_dev_full
def test_a_shard_that_meets_a_full_disk_leaves_no_partial_file_to_hold_the_space(tmp_path: Path) -> None:
    (tmp_path / "shard-000000.tar.tmp").symlink_to("/dev/full")
    writer = ShardWriter(tmp_path / "shard-000000.tar")
    with pytest.raises(DiskFull, match=r"cannot write .*shard-000000\.tar: the disk is full"):
        writer.add([("train-0000000.jpgs", b"x" * 1_000_000)])  # past the write buffer: written at once
    assert list(tmp_path.iterdir()) == []


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
            # the kernel drops a killed process's locks as it exits, a moment before the process can be reaped
            assert time.monotonic() - started >= 0.4 and holder.wait(timeout=10) is not None
            assert f"pid {os.getpid()}" in (tmp_path / "set.lock").read_text()


def test_a_file_system_without_locks_is_said_and_not_fatal(tmp_path: Path, monkeypatch, caplog) -> None:
    def no_locks(*_) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with lock_directory(tmp_path):
        pass
    assert "this file system has no locks" in caplog.text


# --- an output folder that cannot be written ------------------------------------------------------------------------

TINY = ("--arch", "r3d10-tiny", "--batch-size", "2", "--clip.length", "8", "--clip.crop", "32", "--device", "cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    videos = [(noise_frames(8, seed=i, tint=i % 2), i % 2) for i in range(6)]
    return write_dataset(tmp_path_factory.mktemp("data"), {"train": videos[:4], "test": videos[4:]}, ["a", "b"])


def test_an_output_folder_that_cannot_be_written_is_one_line_before_the_work(
    dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """As on a read-only mount (or `chattr +i`): preprocess, train, features, eval --json and verify --report say
    so in one line naming the folder, before they start (eval printed its scores, then a traceback)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    checkpoint = write_checkpoint(tmp_path / "best.pt", TrainConfig(arch="r3d10-tiny", clip=ClipConfig(8, crop=32)))
    scoring = ["--data", str(dataset), "--checkpoint", str(checkpoint), "--device", "cpu"]
    runs = {
        "--out": [
            ["preprocess", "--dataset", "synthetic", "--classes", "2", "--videos-per-class", "2", "--out", str(locked)],
            ["train", "--data", str(dataset), "--out", str(locked / "run"), "--epochs", "1", *TINY],
            ["features", *scoring, "--out", str(locked)],
        ],
        "--json": [["eval", *scoring, "--json", str(locked / "e.json")]],
        "--report": [["preprocess", "verify", str(dataset), "--report", str(locked / "damaged.jsonl")]],
    }
    for flag, commands in runs.items():
        for command in commands:
            with read_only(locked, monkeypatch):
                result = invoke(*command, expect_error=True)
            assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
            assert result.output.count("\n") == 1, result.output  # no score, no progress, no traceback
            said = rf"Error: {flag} {locked}(/run)?: cannot write there \(Read-only file system\): choose a folder "
            assert re.fullmatch(said + r"you can write, or make it writable\n", result.output), result.output
    assert list(locked.iterdir()) == []


def test_a_refused_write_met_mid_work_is_one_line_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """What the checks before the work cannot see (the folder made read-only while it runs): the CLI's boundary."""
    row = {"epoch": 1, "loss": 0.5, "train_top1": 0.5, "val_top1": 0.5, "lr": 0.01}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    with read_only(tmp_path, monkeypatch):
        result = invoke("plot", str(tmp_path), expect_error=True)
    assert result.output.startswith(f"Error: {tmp_path}/") and "Read-only file system" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


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
