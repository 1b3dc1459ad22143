"""Remote reads never hang: stalling and resetting web servers on loopback and `pipe:` commands that stall, each
bounded in time, ending in a retry that resumes, a skipped shard named by URL, or a one-line error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import write_checkpoint
from shardserver import TRICKLE, ShardServer

from dali_skd.config import ClipConfig, TrainConfig
from dali_skd.data import remote
from dali_skd.data.shards import Lost, PartReader, RankPart, SourceStats, load_manifest, shard_records
from dali_skd.data.source import BackgroundBatches, LoaderStalled
from dali_skd.format import FormatError

REPO = Path(__file__).resolve().parents[1]
TINY = ("--arch", "r3d10-tiny", "--epochs", "1", "--batch-size", "4", "--clip.length", "8", "--clip.crop", "32")
TINY += ("--sampling.shuffle-buffer", "2", "--loader.threads", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two classes, 8 training videos in 4 shards (2 each, 61,440 bytes) and 4 test videos in 2."""
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(12)]
    root = tmp_path_factory.mktemp("dataset")
    return write_dataset(root, {"train": videos[:8], "test": videos[8:]}, ["a", "b"], per_shard=2)


@pytest.fixture
def quick_retries(monkeypatch) -> None:
    """Retries after 0.1 s, not after seconds: the tests' time goes to the timeouts they check."""
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.1, 0.1))


def records_of(url: str, read_timeout: float = 10.0) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """(key, media bytes) of a shard's samples, and (where, why) of what was lost."""
    items = list(shard_records(url, "jpgs", read_timeout))
    lost = [(item.where, item.reason) for item in items if isinstance(item, Lost)]
    return [(r.key, bytes(r.media)) for r in items if not isinstance(r, Lost)], lost


def running(marker: str, within: float = 10.0) -> list[str]:
    """The command lines of this machine's processes that hold `marker` after `within` seconds (a process killed
    with its group dies once it is next scheduled, which on a loaded machine may take a moment)."""
    deadline = time.monotonic() + within
    while True:
        found = []
        for pid in os.listdir("/proc"):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and "pytest" not in cmdline:
                found.append(cmdline)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


SHARD = "train/shard-000001.tar"


@pytest.mark.slow
def test_a_stalling_server_is_cut_and_its_shard_skipped(dataset: Path, quick_retries) -> None:
    with ShardServer(dataset, "stall") as server:
        url = f"{server.url}/{SHARD}"
        started = time.monotonic()
        records, skipped = records_of(url, read_timeout=0.5)
        took = time.monotonic() - started
    assert [key for key, _ in records] == ["train-0000002"]  # the whole sample in the half that came
    assert skipped == [
        (f"{url}: sample train-0000003", "no .jpgs member"),  # the one cut: its metadata came
        (url, "shard unreadable from here on: no byte for 0.5 s (gave up after 3 tries)"),
    ]
    assert took < 30
    assert [wanted for path, wanted in server.requests if path == SHARD][1].startswith("bytes=")  # resumed


@pytest.mark.parametrize("ranges", [True, False])
def test_a_reset_is_retried_where_it_was_cut(dataset: Path, quick_retries, ranges: bool) -> None:
    """Once per shard the server resets the connection half-way: the retry asks for the rest (Range), and from a
    server that ignores Range requests takes the whole file it sends instead, skipping what was read; the samples
    are the same."""
    local = records_of(str(dataset / SHARD))
    with ShardServer(dataset, "reset-once", ranges=ranges) as server:
        assert records_of(f"{server.url}/{SHARD}") == local
    asked = [wanted for path, wanted in server.requests if path == SHARD]
    resumed_at = int(asked[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 30720  # where the stream was cut, less what was received but not yet read
    assert asked == [None, f"bytes={resumed_at}-"]


def test_a_server_that_always_resets_gets_the_shard_skipped_by_url(dataset: Path, quick_retries) -> None:
    with ShardServer(dataset, "reset") as server:
        url = f"{server.url}/{SHARD}"
        records, skipped = records_of(url)
    assert [key for key, _ in records] == ["train-0000002"]
    assert skipped[0] == (f"{url}: sample train-0000003", "no .jpgs member")
    ((where, why),) = skipped[1:]
    assert where == url and why.startswith("shard unreadable from here on: the ")
    assert why.endswith("the connection broke while receiving (Connection reset by peer) (gave up after 3 tries)")
    assert "[" not in why and "{" not in why  # words, not a repr of the command


@pytest.mark.slow
def test_a_shard_that_fails_is_read_once_an_epoch_and_its_losses_counted_once_in_every_line(
    dataset: Path, tmp_path: Path, quick_retries
) -> None:
    """Every shard resets half-way, every time: an epoch is one pass over the shards, each tried (3 times) once; the
    half of each that came is trained on, nothing is repeated to fill the epoch, and the samples lost are counted
    once, the same in the epoch's line and at the end, which says that half the epoch was lost."""
    with ShardServer(dataset, "reset") as server:
        result = invoke("train", "--data", server.url, "--out", str(tmp_path / "run"), *TINY)
    asked = [path for path, _ in server.requests if path.endswith(".tar")]
    assert {path: asked.count(path) for path in asked} == {
        f"{split}/shard-{i:06d}.tar": 3 for split, shards in (("train", 4), ("test", 2)) for i in range(shards)
    }
    (epoch,) = [line for line in result.output.splitlines() if line.startswith("epoch 1/1: loss")]
    assert "; 4 damaged or unreadable training samples skipped (50% of the epoch's 8, over the 5% this warns" in epoch
    assert "; 2 damaged or unreadable validation videos skipped" in epoch
    assert "damaged or unreadable, skipped: 4 training samples and 2 validation videos" in result.output
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (metrics["steps"], metrics["skipped"], metrics["val_videos"]) == (1, 4, 2)  # 4 samples of the 8: 1 batch


@pytest.mark.slow
def test_max_bad_samples_counts_the_samples_a_shard_cut_short_lost(tmp_path: Path, quick_retries) -> None:
    """Two shards of 8 samples, each cut half-way every time, by a server that takes no Range requests: what never
    arrives counts as the samples it held (the manifest says how many), past a limit of 2 (counted by shard, it was
    2, and the run went on)."""
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(18)]
    data = write_dataset(tmp_path / "data", {"train": videos[:16], "test": videos[16:]}, ["a", "b"], per_shard=8)
    with ShardServer(data, "reset", ranges=False) as server:
        result = invoke(
            "train", "--data", server.url, "--out", str(tmp_path / "run"), *TINY, "--batch-size", "2",
            "--loader.max-bad-samples", "2", expect_error=True,
        )  # fmt: skip
    lost = re.search(
        r"Error: (\d+) samples of train could not be used, more than --loader.max-bad-samples 2 ", result.output
    )
    assert lost and int(lost[1]) >= 3, result.output  # half of the first shard read, or so


def test_a_trickling_server_is_read_to_the_end(dataset: Path, quick_retries) -> None:
    """Bytes that come one at a time, each sooner than the read timeout, are a slow read, not a stall."""
    local = records_of(str(dataset / SHARD))
    with ShardServer(dataset, "trickle") as server:
        assert records_of(f"{server.url}/{SHARD}", read_timeout=TRICKLE[1] * 3) == local
    assert [wanted for path, wanted in server.requests if path == SHARD] == [None]  # never cut


@pytest.mark.parametrize(
    ("mode", "why", "asked"),
    [
        ("loop", f"more than {remote.MAX_REDIRECTS} redirects (a redirect loop?)", remote.MAX_REDIRECTS + 1),
        ("html", "the server answered with a web page (text/html), not the file: is the URL right?", 1),
    ],
)
def test_a_misdirecting_server_gets_the_shard_skipped_at_once(
    dataset: Path, quick_retries, mode: str, why: str, asked: int
) -> None:
    """A redirect loop and a web page in place of the shard (a login page) are said in words, and not tried again:
    asking again gets the same answer."""
    with ShardServer(dataset, mode) as server:
        url = f"{server.url}/{SHARD}"
        assert records_of(url) == ([], [(url, f"shard unreadable from here on: {why}")])
    assert [path for path, _ in server.requests] == [SHARD] * asked


def test_a_missing_shard_is_not_asked_for_again(dataset: Path, quick_retries) -> None:
    with ShardServer(dataset, "ok") as server:
        url = f"{server.url}/train/shard-000009.tar"
        assert records_of(url) == (
            [],
            [(url, "shard unreadable from here on: the server answered HTTP 404 (Not Found)")],
        )  # fmt: skip
    assert len(server.requests) == 1


@pytest.mark.slow
def test_a_pipe_command_that_stalls_on_the_manifest_or_a_shard(dataset: Path, tmp_path: Path, quick_retries) -> None:
    """`pipe:sleep N; cat ...`: the manifest (and through the CLI, the run) fails with the command and the
    reason; a stalling shard is skipped; no process of the command is left behind."""
    nap = f"sleep {3600 + uuid.uuid4().int % 1000}"  # a command line no other process has
    location = f"pipe:{nap}; cat {dataset}/{{}}"
    started = time.monotonic()
    with pytest.raises(FormatError, match=f"cannot read pipe:{nap}; cat .*manifest.json: no byte for 0.5 s"):
        load_manifest(location, read_timeout=0.5)
    assert time.monotonic() - started < 30
    result = invoke(
        "train", "--data", location, "--loader.read-timeout", "0.5", "--out", str(tmp_path), *TINY, expect_error=True
    )
    *retries, error = result.output.splitlines()  # one line each: the two retries, then the error
    assert len(retries) == 2 and all(line.endswith("; trying again in 0.1 s") for line in retries)
    assert error.startswith(f"Error: cannot read pipe:{nap}; cat ")
    url = f"pipe:case {{}} in *.tar) {nap};; esac; cat {dataset}/{{}}".replace("{}", SHARD)
    records, skipped = records_of(url, read_timeout=0.5)
    assert records == [] and skipped == [
        (url, "shard unreadable from here on: no byte for 0.5 s (gave up after 3 tries)")
    ]
    assert not running(nap)


def test_a_pipe_command_runs_with_a_shell_only_for_shell_syntax(dataset: Path, tmp_path: Path) -> None:
    """Without shell syntax the words of the command are run as they are: `$HOME` stays text."""
    local = records_of(str(dataset / SHARD))
    assert records_of(f"pipe:cat {dataset}/{SHARD}") == records_of(f"pipe:cat {dataset}/{SHARD} | cat") == local
    words = tmp_path / "words"
    (tmp_path / "say").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {words}\ncat {dataset}/{SHARD}\n')
    (tmp_path / "say").chmod(0o755)
    assert records_of(f"pipe:{tmp_path}/say '$HOME' a") == local
    assert words.read_text() == "$HOME\na\n"
    records, skipped = records_of(f"pipe:{tmp_path}/say 'unclosed")
    assert records == [] and "cannot split the command into words (No closing quotation)" in skipped[0][1]


def test_the_watchdog_names_the_shard_being_read() -> None:
    reader = PartReader(RankPart(["http://example.org/a.tar"]), SourceStats(), "jpgs", lambda record: None)
    reader.reading = "http://example.org/a.tar"
    hold = threading.Event()

    def stuck():
        hold.wait()
        yield {}

    source = BackgroundBatches(stuck, stall_timeout=0.2, reader=reader)
    with pytest.raises(
        LoaderStalled, match=r"no batch for 0.2 s \(--loader.stall-timeout\), while reading http://example"
    ):
        source()
    hold.set()
    source.close()


@pytest.mark.slow
def test_train_on_a_stalling_server_stops_with_one_line(dataset: Path, tmp_path: Path) -> None:
    """`cli.py train` as a user runs it, the server sending half of each shard: the watchdog stops the run (through
    DALI's pipeline) with one line naming the shard, long before the reads would give up; the process ends though
    its reading thread is still waiting on the socket."""
    with ShardServer(dataset, "stall") as server:
        command = [sys.executable, str(REPO / "cli.py"), "train", "--data", server.url, "--out", str(tmp_path), *TINY]
        started = time.monotonic()
        done = subprocess.run(
            [*command, "--loader.read-timeout", "600", "--loader.stall-timeout", "3"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        took = time.monotonic() - started
    assert done.returncode == 1
    assert done.stderr.count("Error: ") == 1  # after the progress bar, on its line: no newline ends a bar
    last = done.stderr[done.stderr.index("Error: ") :].splitlines()[0]
    assert last.startswith("Error: the loader produced no batch for 3 s (--loader.stall-timeout), while reading ")
    assert f"{server.url}/train/shard-00000" in last and "Traceback" not in done.stderr
    assert took < 150


def test_an_eval_that_scored_no_video_exits_non_zero(dataset: Path, tmp_path: Path, quick_retries) -> None:
    served = tmp_path / "served"
    shutil.copytree(dataset, served)
    for shard in (served / "test").iterdir():
        shard.unlink()  # answered with 404
    write_checkpoint(tmp_path / "best.pt", TrainConfig(arch="r3d10-tiny", clip=ClipConfig(length=8, crop=32)))
    with ShardServer(served, "ok") as server:
        result = invoke(
            "eval", "--data", server.url, "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu",
            "--loader.threads", "1", expect_error=True,
        )  # fmt: skip
    assert "Error: " in result.output and "on test: no video could be scored (4 skipped as unreadable" in result.output


@pytest.mark.slow
def test_a_retried_read_is_said_at_the_default_log_level(dataset: Path, tmp_path: Path) -> None:
    """`cli.py preprocess verify` over http, the server resetting each shard half-way once: one line per shard says
    the read is tried again (it was at INFO, below what Python shows unconfigured), and the check passes."""
    with ShardServer(dataset, "reset-once") as server:
        done = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), "preprocess", "verify", server.url, "--workers", "2",
             "--report", str(tmp_path / "damaged.jsonl")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    retried = [line for line in done.stderr.splitlines() if "trying again in 1 s" in line]
    shards = sorted(path for path, wanted in server.requests if wanted is not None)
    assert len(shards) == 6 and len(retried) == 6
    for path, line in zip(shards, sorted(retried), strict=True):
        assert line.startswith(f"{server.url}/{path}: ") and " at byte " in line
