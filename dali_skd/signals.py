"""Stopping a long command cleanly on a signal: SIGTERM (what SLURM sends on preemption, at the time limit and on
`scancel`; torchrun forwards it to its workers), SIGINT (Ctrl-C) and SIGUSR1 (what `sbatch --signal` sends ahead of
the time limit).

Inside `stop_on_signals()` the first of them only sets a flag: the command finishes what it is doing (`train`: the
current step), saves where it is and raises `Stopped`, which the CLI prints as one line before exiting with
`EXIT_STOPPED` (75, EX_TEMPFAIL: run me again). A later signal, `REPEAT_SECONDS` or more after the first, ends the
process at once (exit status 128 + its number). One within that time is the same signal delivered twice, not a
person insisting: SLURM signals every process of a job step, and torchrun forwards what it receives to its workers.
Once the work is saved (`work_saved`), signals are ignored: torchrun sends one to the workers still running as soon
as one of them exits, and they are on their way out already. The CLI ignores them from then on, to the end of the
process, so that it exits with 75 (requeue me), never 128 + N, however often it is signalled on its way out.

Signals are watched from a thread (`signal.set_wakeup_fd`): Python runs its handlers only between two bytecodes of
the main thread, which a training step spends seconds in C++ without reaching, or forever if it hangs; so each
signal is seen when it arrives, and a second one ends even a hung process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_SECONDS = 1.0


class Stopped(Exception):
    """A command stopped on a signal once its work was saved: `what` happened, and `how` to go on."""

    def __init__(self, what: str, how: str = "run the same command again to continue") -> None:
        super().__init__(f"{what}; {how}")
        self.what, self.how = what, how


_installed = False
_first: tuple[signal.Signals, float] | None = None  # the first signal received, and when
_saved = False  # the work is saved: nothing is lost if the process ends, nothing left to hurry


def stop_requested() -> str | None:
    """The name of the signal that asked the command to stop (SIGTERM, ...), or None."""
    return _first[0].name if _first is not None else None


def work_saved() -> None:
    """The command has saved its work and is about to end: later signals change nothing."""
    global _saved
    _saved = True


def _received(signum: int, now: float) -> None:
    global _first
    if _saved:
        return
    name = signal.Signals(signum).name
    if _first is None:
        _first = (signal.Signals(signum), now)
        if os.environ.get("RANK", "0") == "0":  # one line for a whole torchrun job
            os.write(2, f"\n{name}: saving, then stopping at the next safe point ({name} again: at once)\n".encode())
    elif now - _first[1] >= REPEAT_SECONDS:
        os.write(2, f"\n{name} again: stopping at once\n".encode())
        os._exit(128 + signum)


def _watch(fd: int) -> None:
    """Reads the number of each signal as it arrives (Python's own handler writes it to the pipe)."""
    with open(fd, "rb", buffering=0) as pipe:
        while received := pipe.read(64):
            now = time.monotonic()
            for signum in received:
                if signum in STOP_SIGNALS:  # the pipe hears every signal Python handles
                    _received(signum, now)


def _ignore(signum: int, frame: object) -> None:
    """Python's handler, which must exist for the signal to reach the pipe; the watching thread does the work."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, STOP_SIGNALS set the flag `stop_requested` reads; the previous handlers come back after it.
    Nested blocks share the outer one's; outside the main thread (where Python takes no handlers) it does nothing."""
    global _installed, _first, _saved
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    read, write = os.pipe()
    os.set_blocking(write, False)
    _installed, _first, _saved = True, None, False
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read,), daemon=True, name="dali-skd-signals")
    watcher.start()
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, _ignore)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write)  # the watcher reads the end of the pipe and returns
        watcher.join()
        _installed, _first, _saved = False, None, False
