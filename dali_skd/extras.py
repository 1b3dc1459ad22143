"""Optional packages, each installed by an extra of pyproject.toml (`pip install -e '.[wandb]'`): one not installed
is one line naming the extra that installs it, not a traceback from deep inside a run."""

from __future__ import annotations

import importlib
from types import ModuleType

from dali_skd.errors import RunFailed


class MissingExtra(RunFailed):
    """A package an asked-for feature needs is not installed."""


def missing_extra(error: ModuleNotFoundError, extra: str, what: str) -> MissingExtra:
    """The one-line error for `error`, raised importing what `extra` installs (`what`: the feature, in words)."""
    return MissingExtra(
        f"{what} needs the extra {extra!r} ({error.name or 'a module'} is not installed): "
        f"pip install -e '.[{extra}]' in the clone of dali-skd (or pip install 'dali-skd[{extra}]')"
    )


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module`, imported; `MissingExtra` naming `extra` if it (or a package it needs) is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing_extra(e, extra, what) from e
