"""Click options made from the config dataclasses: every field is a flag of the same name (nested configs are
flattened: `TrainConfig.loader.crop` is `--crop`), so the CLI, the code and the saved config never disagree."""

from __future__ import annotations

import dataclasses
import functools
import shlex
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import click

from dali_skd.config import from_dict, load_json, to_dict

T = TypeVar("T")


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out += _leaves(kind, (*prefix, f.name))
        else:
            out.append(((*prefix, f.name), f, kind))
    return out


class _FlagOrChoice(click.Choice):
    """`--flag` alone (True) or `--flag CHOICE`: a field typed `bool | Literal[...]` (`--resume`, `--resume auto`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if value is True else super().convert(value, param, ctx)


def _click_type(kind: Any) -> tuple[Any, dict[str, Any]]:
    """The click type (and extra option settings) of a field's annotation."""
    args = typing.get_args(kind)
    choices = [str(c) for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and bool in args and choices:
        return _FlagOrChoice(choices), {"is_flag": False, "flag_value": True}
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return _click_type(next(a for a in args if a is not type(None)))
    if typing.get_origin(kind) is Literal:
        return click.Choice([str(a) for a in args]), {}
    if typing.get_origin(kind) is tuple:
        return args[0], {"nargs": len(args)}
    return kind, {}


def config_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Adds a `--flag` for each field of `cls` (and of its nested configs), defaulting to "not given"."""

    defaults = to_dict(cls())  # a nested config's own defaults may differ from its class's (compare's --out)

    def decorate(command: Callable) -> Callable:
        for path, f, kind in reversed(_leaves(cls)):
            name = f.metadata.get("flag", path[-1])  # a field may be given a shorter flag than its name
            if path[-1] in exclude:
                continue
            flag = "--" + name.replace("_", "-")
            default = functools.reduce(lambda node, key: node[key], path, defaults)
            help_text = f"{f.metadata.get('help', '')}  [default: {_show(default)}]"
            if kind is bool:
                decl = [f"{flag}/--no-{flag[2:]}"]
                command = click.option(*decl, name, default=None, help=help_text)(command)
            else:
                click_type, extra = _click_type(kind)
                command = click.option(flag, name, type=click_type, default=None, help=help_text, **extra)(command)
        return command

    return decorate


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_config(
    cls: type[T], options: dict[str, Any], config_file: str | None = None, defaults: dict[str, Any] | None = None
) -> T:
    """Defaults, then `defaults` (a partial nested dict, e.g. the clip settings a checkpoint was trained with), then
    `config_file` (a saved config.json), then the flags that were given."""
    base = to_dict(cls())
    _merge(base, defaults or {})
    if config_file:
        base = to_dict(load_json(cls, config_file))
    for path, f, _ in _leaves(cls):
        value = options.get(f.metadata.get("flag", path[-1]))
        if value is None:
            continue
        node = base
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return from_dict(cls, base)


def _merge(base: dict[str, Any], partial: dict[str, Any]) -> None:
    for key, value in partial.items():
        if isinstance(value, dict):
            _merge(base[key], value)
        else:
            base[key] = value


def command_line(command: str, options: dict[str, Any]) -> str:
    """`python cli.py COMMAND` with the flags that were given (`options` as click passes them): the command that
    reproduces a run however it was started."""
    words = ["python", "cli.py", *command.split()]
    for name, value in options.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, *map(str, value if isinstance(value, tuple) else (value,))]
    return shlex.join(words)
