"""The project's own errors: a problem with the user's input, files, settings or machine that the user can act on.
The command line prints one of these as one line (what was wrong, where, and what to do) and exits 1; any other
exception is a bug (or the machine failing), reported as one with its traceback kept in a file (`internal_error`).

Each error also derives from the built-in exception it was before there was a base class (a bad setting is still a
ValueError), so that code catching those goes on catching them."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


class DaliSkdError(Exception):
    """An error a user can act on; its message names the file, shard or setting and what to do next."""


class ConfigError(DaliSkdError, ValueError):
    """A setting (a flag, a config file, an environment variable) that cannot be used as given."""


class InputError(DaliSkdError, ValueError):
    """A file given to a command that it cannot use: a checkpoint, a video, a model file, a run's metrics."""


class MissingInput(DaliSkdError, FileNotFoundError):
    """A file or folder a command needs is not where it was named."""


class OutputExists(DaliSkdError, FileExistsError):
    """The output folder already holds what the command would write."""


class RunFailed(DaliSkdError, RuntimeError):
    """The work could not reach a usable result: no usable sample, too many damaged ones, the device asked for is not
    there, videos that could not be predicted."""


_PROJECT = Path(__file__).resolve().parents[1]  # the folder holding dali_skd/, preprocess/ and cli.py


def _project_file(filename: str) -> str | None:
    """A frame's file relative to the project, or None for a library's."""
    path = Path(filename).resolve()
    if path.is_relative_to(_PROJECT) and not {"site-packages", "dist-packages"} & set(path.parts):
        return str(path.relative_to(_PROJECT))
    return None


def _shown(filename: str) -> str:
    """A frame's file as a person finds it: the project's relative to it, a library's from its package on."""
    parts = Path(filename).parts
    marker = next((m for m in ("site-packages", "dist-packages") if m in parts), None)
    return _project_file(filename) or (str(Path(*parts[parts.index(marker) + 1 :])) if marker else filename)


def raised_at(error: BaseException) -> str:
    """`dali_skd/data/clips.py:67`: where `error` was raised; where that is in a library, with the project's line that
    called into it (`torch/nn/functional.py:2812, called from dali_skd/step.py:40`)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "an unknown place"
    last = frames[-1]
    where = f"{_shown(last.filename)}:{last.lineno}"
    if _project_file(last.filename) is None:
        ours = next((f for f in reversed(frames) if _project_file(f.filename)), None)
        if ours is not None:
            where += f", called from {_project_file(ours.filename)}:{ours.lineno}"
    return where


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# an exception's text that says memory ran out: torch's, DALI's (whose allocators raise a RuntimeError), the C++
# runtime's
_OUT_OF_MEMORY_WORDS = ("out of memory", "cuda allocation failed", "bad_alloc", "can't allocate", "cannot allocate")
# the settings that size what a command holds in memory, most effective first: those the command has are named
_GPU_MEMORY_FLAGS = ("--batch-size", "--loader.prefetch")
_HOST_MEMORY_FLAGS = ("--batch-size", "--loader.prefetch", "--sampling.shuffle-buffer", "--workers")


def _memory_ran_out(error: BaseException) -> str | None:
    """Where memory ran out ("the GPU", "this machine") if `error` says so, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return "the GPU"
    if isinstance(error, MemoryError):
        return "this machine"
    text = str(error).lower()
    if isinstance(error, RuntimeError) and any(words in text for words in _OUT_OF_MEMORY_WORDS):
        return "the GPU" if "cuda" in text or "gpu" in text else "this machine"
    return None


def out_of_memory(error: BaseException, flags: set[str]) -> str | None:
    """One line for an error that says memory ran out (torch.OutOfMemoryError, MemoryError, DALI's; or an error
    raised from one), naming which of the command's `flags` to lower; None for any other error."""
    for e in _chain(error):
        if (where := _memory_ran_out(e)) is None:
            continue
        lower = [flag for flag in (_GPU_MEMORY_FLAGS if where == "the GPU" else _HOST_MEMORY_FLAGS) if flag in flags]
        advice = f"lower {' or '.join(lower)}" if lower else "free memory (other processes), or use a larger machine"
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        said = f"{type(e).__name__}: {text}" if text else type(e).__name__
        return f"out of memory on {where} ({said}), at {raised_at(error)}: {advice}, then run the command again"
    return None


def internal_error(error: BaseException, folder: str | None = None) -> str:
    """The one line for an exception that is not the user's to fix (a bug, or the machine failing): what it was and
    where it was raised, with its traceback written to a file the line names (in the temporary folder, $TMPDIR,
    unless `folder` is given), together with the command line and the versions a bug report needs."""
    what = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}" if str(error).strip() else ""
    line = f"internal error (a bug in dali-skd, or the machine failing): {what or type(error).__name__}, raised at "
    line += raised_at(error)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rank = os.environ.get("RANK")
    name = f"dali-skd-error-{stamp}-{os.getpid()}" + (f"-rank{rank}" if rank else "") + ".txt"
    path = Path(folder or tempfile.gettempdir()) / name
    loaded = ("torch", "nvidia.dali", "numpy")
    versions = [f"{m} {sys.modules[m].__version__}" for m in loaded if hasattr(sys.modules.get(m), "__version__")]
    report = (
        f"command: {' '.join(sys.argv)}\n"
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        f"python {platform.python_version()} on {platform.platform()}; {', '.join(versions) or 'no library loaded'}\n"
        f"\n{''.join(traceback.format_exception(error))}"
    )
    try:
        path.write_text(report)
    except OSError as e:  # no room or no right to write there: the traceback goes to stderr instead
        print(report, file=sys.stderr)
        return f"{line}; its traceback is above (it could not be written to {path}: {e.strerror})"
    return f"{line}; its traceback is in {path}: please attach it to a bug report"
