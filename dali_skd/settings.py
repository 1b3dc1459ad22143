"""How a setting is declared and checked: with pydantic. A config is a pydantic dataclass (`@settings`; still a
dataclass: `dataclasses.replace`, `asdict`), each field a `setting`, with its help and its limits. `from_dict` checks a
nested dict (a config file, a checkpoint's config, the flags) against a config and says what is wrong in one line: the
setting by its dotted path (or its flag), its value and what it must be. The code below the command line trusts a
config it is given. The settings themselves: `config.py`, and the augmentations' in `data/augment.py`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import operator
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError, PydanticKnownError, core_schema

from dali_skd.errors import ConfigError

Range = tuple[float, float]  # LO HI, e.g. the values an augmentation draws its parameter from

# every config: a value is taken only as it is (no text for a number, no number for true or false: strict), an
# unknown setting is an error, and so is a number that is not finite
SETTINGS = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

T = TypeVar("T")


@typing.dataclass_transform(field_specifiers=(Field,))
def settings(cls: type[T]) -> type[T]:
    """A config class: a pydantic dataclass, which checks its settings as `SETTINGS` says."""
    return dataclass(config=SETTINGS)(cls)


# a limit's words (`--help`, messages), its pydantic error and its test, by the name pydantic gives it
LIMITS = {
    "ge": ("at least", "greater_than_equal", operator.ge),
    "gt": ("more than", "greater_than", operator.gt),
    "le": ("at most", "less_than_equal", operator.le),
    "lt": ("less than", "less_than", operator.lt),
    "multiple_of": ("a multiple of", "multiple_of", lambda x, m: x % m == 0),
}


@dataclasses.dataclass(frozen=True)
class Within:
    """What pydantic's own constraints cannot say of a setting, checked after its type (`setting` puts it in the
    field): the limits of each number of a range (LO HI, which also needs LO not above HI), or the few values a
    whole number may take."""

    limits: Mapping[str, float] = dataclasses.field(default_factory=dict)
    choices: tuple[int, ...] = ()

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: Any) -> Any:
        for x in value if isinstance(value, tuple) else (value,):
            for key, limit in self.limits.items():
                if not LIMITS[key][2](x, limit):
                    raise PydanticKnownError(LIMITS[key][1], {key: limit})  # type: ignore[arg-type]
        if isinstance(value, tuple) and value[0] > value[1]:
            raise PydanticCustomError("range_order", "a range is LO HI, with LO not above HI")
        if self.choices and value not in self.choices:
            raise PydanticCustomError("one_of", "it must be {choices}", {"choices": self.words()})
        return value

    def words(self) -> str:
        return " or ".join(map(str, self.choices))


def setting(
    default: Any,
    help: str,
    *,
    at_least: float | None = None,
    more_than: float | None = None,
    at_most: float | None = None,
    less_than: float | None = None,
    multiple_of: int | None = None,
    one_of: tuple[int, ...] = (),
) -> Any:
    """A config field: its default, its CLI help, and for a number (for a range, each of its numbers) its limits,
    checked wherever a config is read (`from_dict`) and said in `--help` (`cli_options`). A config made in Python is
    checked too."""
    if dataclasses.is_dataclass(default):  # a part: each config gets its own copy
        return Field(default_factory=lambda: copy.deepcopy(default), description=help)
    given = {"ge": at_least, "gt": more_than, "le": at_most, "lt": less_than, "multiple_of": multiple_of}
    limits = {key: limit for key, limit in given.items() if limit is not None}
    ranged = isinstance(default, tuple)  # pydantic's constraints are on a value, not on each number of a range
    info = Field(default, description=help, **({} if ranged else limits))
    if ranged or one_of:
        info.metadata.append(Within(limits if ranged else {}, one_of))
    return info


def limits_of(info: Any) -> dict[str, float]:
    """A field's limits, by pydantic's names (`ge`, `gt`, `le`, `lt`, `multiple_of`; a range's: those of each of its
    numbers), in the order of `LIMITS`."""
    found: dict[str, float] = {}
    for m in info.metadata:  # pydantic's constraints (annotated_types' Ge, Gt, ...), or ours
        found |= m.limits if isinstance(m, Within) else {key: getattr(m, key) for key in LIMITS if hasattr(m, key)}
    return {key: found[key] for key in LIMITS if key in found}


def from_dict(cls: type[T], raw: Any, where: str = "config", flags: bool = False) -> T:
    """Build `cls` from a (possibly partial) nested dict (a saved config, a checkpoint's: input from anyone); an
    unknown key, or a value not of its setting's type or outside its limits, is a `ConfigError` that names it: by its
    dotted path under `where`, or (`flags`: the command line's settings) as the flag that sets it."""
    try:
        as_json = json.dumps(raw)  # as a config file holds it: checked as JSON, where a list may be a range
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: not a group of settings as JSON holds them ({e})") from None
    try:
        return _adapter(cls).validate_json(as_json)
    except ValidationError as e:
        raise ConfigError(_said(cls, raw, e.errors()[0], where, flags)) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _said(cls: type, raw: Any, error: Any, where: str, flags: bool) -> str:
    """One of pydantic's errors in words: the setting, its value, and what it must be."""
    path: list[str] = []  # the fields `error` is in: its location's names up to a union's branch or a range's number
    owner, kind = cls, cls
    for key in error["loc"]:
        if not (dataclasses.is_dataclass(owner) and key in owner.__dataclass_fields__):
            break
        path.append(key)
        kind = owner = typing.get_type_hints(owner)[key]
    value = functools.reduce(operator.getitem, path, raw)  # the setting's value as given, whole (a range's two)
    name = "--" + ".".join(path).replace("_", "-") if flags else ".".join([where, *path] if where else path)
    kind_of_error = error["type"]
    if kind_of_error == "unexpected_keyword_argument":
        known = ", ".join(f.name for f in dataclasses.fields(owner))
        return f"{name}: unknown setting {error['loc'][len(path)]!r} (known: {known})"
    if kind_of_error in ("dataclass_type", "dataclass_args_type"):
        return f"{name} is {value!r:.60}, not a group of settings"
    shown = " ".join(str(float(x)) for x in value) if kind == Range else float(value) if kind is float else value
    limit = next((key for key, (_, error_type, _) in LIMITS.items() if error_type == kind_of_error), None)
    if limit is not None:
        each = "each of its numbers" if kind == Range else "it"
        return f"{name} is {shown}; {each} must be {LIMITS[limit][0]} {error['ctx'][limit]:g}"
    if kind_of_error == "finite_number":
        return f"{name} is {shown}; it must be a finite number"
    if kind_of_error in ("range_order", "one_of"):
        return f"{name} is {shown}; {error['msg']}"
    return f"{name} is {value!r:.60}, not {_kind(kind)}"


def _kind(kind: Any) -> str:
    """An annotation in words: `an integer`, `one of 'paper', 'kinetics'`, `a pair of numbers or None`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(map(repr, args))
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(args)} numbers"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "None"}[kind]
