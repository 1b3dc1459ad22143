"""Progress of a long loop: a tqdm bar on a terminal; where stderr is a file or a pipe (SLURM, nohup, `| tee`),
plain lines instead, one every `DALI_SKD_LOG_SECONDS` seconds (default 60), each whole: done/total, the caller's
figures, the rate and the time left. A log file then holds readable lines, not carriage-return redraws.

What the project's modules log (`logging.getLogger(__name__)`: a retried read, a skipped sample, a rebuilt
pipeline, an epoch done) goes out the same way, a plain line on stderr above any bar (`configure_logging`, called
once by the command line)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from dali_skd.errors import ConfigError

LOG_SECONDS_ENV = "DALI_SKD_LOG_SECONDS"
DEFAULT_LOG_SECONDS = 60.0
LOG_LEVEL_ENV = "DALI_SKD_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOGGERS = ("dali_skd", "preprocess")  # the project's packages: a library's own logging is left as it is


class _Lines(logging.Handler):
    """A record as one plain line on stderr (whatever `sys.stderr` is when it is written), above the progress bars
    on a terminal (`tqdm.write`)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's own policy: a record that cannot be written is reported, never raised
            self.handleError(record)


def configure_logging(level: str = "info") -> None:
    """Shows what the project's modules log at `level` (one of LOG_LEVELS) and above, as plain lines on stderr.
    Under torchrun only rank 0 speaks, but for errors, which name their rank. Calling it again replaces the
    setting."""
    handler = _Lines()
    rank = int(os.environ.get("RANK", "0"))
    if rank:  # the ranks read the same data and run the same steps: one voice, unless something failed here
        handler.addFilter(lambda record: record.levelno >= logging.ERROR)
        handler.setFormatter(logging.Formatter(f"rank {rank}: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _Lines)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper())


def log_seconds() -> float:
    """Seconds between plain progress lines, from the environment."""
    text = os.environ.get(LOG_SECONDS_ENV)
    if text is None:
        return DEFAULT_LOG_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(
            f"{LOG_SECONDS_ENV}={text!r}: give the seconds between progress lines, e.g. 60 (0: every step)"
        )
    return seconds


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`total` (or an unknown number of) `unit`s under `desc`, starting at `initial` done. `show(**figures)` puts the
    caller's figures on the bar, or prints a line with them when one is due; `update(n)` counts work done."""

    def __init__(
        self, desc: str, total: int | None, unit: str, enabled: bool = True, initial: int = 0, leave: bool = True
    ) -> None:
        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.done = initial
        terminal = sys.stderr.isatty()
        self.bar = (
            tqdm(desc=desc, total=total, unit=unit, initial=initial, leave=leave) if enabled and terminal else None
        )
        self.plain = enabled and not terminal
        self.interval = log_seconds() if self.plain else 0.0
        self.started = self.last = time.perf_counter()

    def due(self) -> bool:
        """Whether a plain line is due (never on a terminal: the bar redraws itself)."""
        return self.plain and time.perf_counter() - self.last >= self.interval

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **figures: Any) -> None:
        """The figures (name -> text) on the bar; without a terminal, in a line if one is due."""
        if self.bar is not None:
            if figures:
                self.bar.set_postfix(figures, refresh=False)  # drawn with the next update
        elif self.due():
            self.last = time.perf_counter()
            print(self.line(figures), file=sys.stderr, flush=True)

    def line(self, figures: dict[str, Any]) -> str:
        """`epoch 3/200: 120/400 steps, loss 1.234, 2.1 steps/s, 2m13s left`."""
        rate = (self.done - self.initial) / max(time.perf_counter() - self.started, 1e-9)
        done = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        parts = [
            f"{done} {self.unit}s",
            *(f"{name.replace('_', ' ')} {value}" for name, value in figures.items()),
            f"{rate:.2f} {self.unit}s/s",
        ]
        if self.total is not None and rate > 0:
            parts.append(f"{duration((self.total - self.done) / rate)} left")
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
