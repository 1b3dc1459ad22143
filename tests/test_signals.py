"""Stopping on a signal (`dali_skd.signals`), in a real process receiving real signals: the first sets the flag,
the same signal again at once (SLURM and torchrun both delivering it) is one, a later one ends the process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

SCRIPT = """
import os, signal, sys, time
from dali_skd.signals import stop_on_signals, stop_requested, work_saved

def flag():  # the signal is seen by a thread: a moment after it arrives
    deadline = time.monotonic() + 30
    while stop_requested() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return stop_requested()

before = signal.getsignal(signal.SIGTERM)
with stop_on_signals():
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    print("flag", flag(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # another at once: one delivered twice (SLURM, then torchrun forwarding it)
    time.sleep(0.5)
    print("alive", stop_requested(), flush=True)
    if sys.argv[2] != "once":
        if sys.argv[2] == "saved":
            work_saved()  # on its way out: torchrun signalling the last workers changes nothing
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGTERM)  # a person insisting
        time.sleep(5)
        print("still alive", flush=True)
print("restored", signal.getsignal(signal.SIGTERM) is before, stop_requested(), flush=True)
"""


def run(first: str, then: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, first, then], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_asks_to_stop_once_even_when_delivered_twice(first: str) -> None:
    done = run(first, "once")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"flag {first}", f"alive {first}", "restored True None"]
    assert f"{first}: saving, then stopping at the next safe point" in done.stderr


def test_a_second_signal_later_ends_the_process_at_once() -> None:
    done = run("SIGTERM", "again")
    assert done.returncode == 128 + signal.SIGTERM and "still alive" not in done.stdout
    assert "SIGTERM again: stopping at once" in done.stderr


def test_once_its_work_is_saved_a_process_ignores_signals() -> None:
    done = run("SIGTERM", "saved")
    assert done.returncode == 0 and "still alive" in done.stdout


STOPPED_COMMAND = """
import atexit, os, signal, time
import click
from cli import user_errors
from dali_skd.signals import Stopped, stop_on_signals, stop_requested, work_saved

@click.command()
@user_errors
def command():
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        while stop_requested() is None:
            time.sleep(0.01)
        work_saved()
        raise Stopped("stopped by SIGTERM at step 3")

def insist():  # a second SIGTERM as the process ends (its threads and DALI's pipelines take a moment there)
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print("exiting", flush=True)

atexit.register(insist)
command()
"""


def test_a_signal_after_the_work_was_saved_still_exits_75_to_be_requeued() -> None:
    done = subprocess.run([sys.executable, "-c", STOPPED_COMMAND], capture_output=True, text=True, timeout=60)
    assert done.returncode == 75 and "exiting" in done.stdout, (done.returncode, done.stderr)
    assert "stopped by SIGTERM at step 3; run the same command again to continue" in done.stderr
