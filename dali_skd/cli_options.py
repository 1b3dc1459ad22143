"""Click options made from a command's config dataclass, one per field, so that the CLI, the code and the saved
config never disagree. One convention everywhere: a top-level field is `--name`, a field of a nested part is
`--part.name` (`TrainConfig.loader.threads` is `--loader.threads`), with hyphens within a name and dots between
parts; a bool is `--name/--no-name` (`--sampling.same-clip/--sampling.no-same-clip`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import shlex
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import click

from dali_skd.config import read_settings, to_dict
from dali_skd.settings import LIMITS, Within, from_dict, limits_of

T = TypeVar("T")
Path = tuple[str, ...]  # a field's names from the top: ("loader", "threads")


def leaves(cls: type, prefix: Path = ()) -> list[tuple[Path, dataclasses.Field, Any]]:
    """(path, field, type) of every field that is not a part, in the order `--help` lists them: a config's own
    fields, then those it inherits (`CompareConfig`'s before the training settings it shares), then each part's."""
    hints = typing.get_type_hints(cls)
    own = inspect.get_annotations(cls)
    fields = dataclasses.fields(cls)
    parts = [f for f in fields if _is_part(hints[f.name])]
    scalars = sorted((f for f in fields if f not in parts), key=lambda f: f.name not in own)
    out = [((*prefix, f.name), f, hints[f.name]) for f in scalars]
    for f in parts:
        out += leaves(hints[f.name], (*prefix, f.name))
    return out


def _is_part(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def flag(path: Path, negated: bool = False) -> str:
    """`("loader", "read_timeout")` -> `--loader.read-timeout` (`negated`: `--loader.no-read-timeout`)."""
    *parts, name = (p.replace("_", "-") for p in path)
    return "--" + ".".join([*parts, f"no-{name}" if negated else name])


def _key(path: Path) -> str:
    """The click parameter's name of a field (an identifier): `loader__read_timeout`."""
    return "__".join(path)


class _FlagOrChoice(click.Choice):
    """`--flag` alone (True) or `--flag CHOICE`: a field typed `bool | Literal[...]` (`--resume`, `--resume auto`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if value is True else super().convert(value, param, ctx)


def click_type(kind: Any) -> tuple[Any, dict[str, Any]]:
    """The click type (and extra option settings) of a field's annotation."""
    args = typing.get_args(kind)
    choices = [str(c) for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and bool in args and choices:
        return _FlagOrChoice(choices), {"is_flag": False, "flag_value": True}
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return click_type(next(a for a in args if a is not type(None)))
    if typing.get_origin(kind) is Literal:
        return click.Choice([str(a) for a in args]), {}
    if typing.get_origin(kind) is tuple:
        return args[0], {"nargs": len(args)}
    return kind, {}


def config_options(cls: type) -> Callable[[Callable], Callable]:
    """Adds an option for each field of `cls` and of its parts, defaulting to "not given"."""

    defaults = to_dict(cls())  # a config's own defaults may differ from its parts' classes' (compare's --out)

    def decorate(command: Callable) -> Callable:
        for path, _, kind in reversed(leaves(cls)):
            default = functools.reduce(lambda node, key: node[key], path, defaults)
            info = _field_info(cls, path)
            help_text = f"{info.description}  [default: {_show(default)}{_limits(info)}]"
            if kind is bool:
                decl = f"{flag(path)}/{flag(path, negated=True)}"
                command = click.option(decl, _key(path), default=None, help=help_text)(command)
            else:
                option_type, extra = click_type(kind)
                command = click.option(flag(path), _key(path), type=option_type, default=None, help=help_text, **extra)(
                    command
                )
        return command

    return decorate


def _field_info(cls: type, path: Path) -> Any:
    """The pydantic field (help, limits) of the setting at `path` of config `cls`."""
    for name in path[:-1]:
        cls = typing.get_type_hints(cls)[name]
    return cls.__pydantic_fields__[path[-1]]


def _limits(info: Any) -> str:
    """A setting's limits for its help: `; at least 1`, `; more than 0, at most 1`, `; 1 or 3`."""
    said = [f"{LIMITS[key][0]} {limit}" for key, limit in limits_of(info).items()]
    said += [m.words() for m in info.metadata if isinstance(m, Within) and m.choices]
    return "; " + ", ".join(said) if said else ""


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_config(
    cls: type[T], options: dict[str, Any], config_file: str | None = None, defaults: dict[str, Any] | None = None
) -> T:
    """Defaults, then `defaults` (a partial nested dict, e.g. the clip settings a checkpoint was trained with), then
    `config_file` (a saved config.json, whole or partial), then the flags that were given."""
    base = to_dict(cls())
    _merge(base, defaults or {})
    if config_file:
        _merge(base, read_settings(cls, config_file))
    for path, _, _ in leaves(cls):
        value = options.get(_key(path))
        if value is None:
            continue
        node = base
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return from_dict(cls, base, where="", flags=True)


def _merge(base: dict[str, Any], partial: dict[str, Any]) -> None:
    for key, value in partial.items():
        if isinstance(value, dict):
            _merge(base[key], value)
        else:
            base[key] = value


def command_line(command: str, options: dict[str, Any], config_file: str | None = None) -> str:
    """`python cli.py COMMAND` with the flags that were given (`options` as click passes them) and `--config FILE`:
    the command that reproduces a run however it was started."""
    words = ["python", "cli.py", *command.split(), *(["--config", config_file] if config_file else [])]
    for key, value in options.items():
        if value is None:
            continue
        path = tuple(key.split("__"))
        if isinstance(value, bool):
            words.append(flag(path, negated=not value))
        else:
            words += [flag(path), *map(str, value if isinstance(value, tuple) else (value,))]
    return shlex.join(words)
