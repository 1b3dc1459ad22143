"""`cli.py compare`: the paper's Table II as one command, a plan for the comparison engine (`comparison.py`):
every method x seed trained with the same settings (any `train` flag but --method and --seed applies to all), again
under each value of `--vary SETTING=V1,V2` as extra rows, each best checkpoint evaluated as `eval` does, and
OUT/table.md, table.json and compare.png written with the verdicts."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import TYPE_CHECKING, Literal

import click

from dali_skd.cli_options import click_type, flag, leaves
from dali_skd.config import TrainSettings, clips_per_video_field, from_dict, to_dict, val_fraction_field
from dali_skd.errors import ConfigError
from dali_skd.files import check_not_in_use
from dali_skd.settings import setting, settings

if TYPE_CHECKING:
    from dali_skd.comparison import CompareReport, Variant

TeacherMethod = Literal["baseline", "baseline-aug", "self-kd", "skd-srl"]  # config.MethodName but kd


@settings
class CompareConfig(TrainSettings):
    """`cli.py compare`: what to compare, and the settings every run shares."""

    methods: str = setting("baseline,baseline-aug,kd,self-kd,skd-srl", "methods to compare, comma-separated")
    seeds: int = setting(3, "runs per method, with seeds 0, 1, ...", at_least=1)
    reference: str = setting(
        "baseline", "every other method is compared with this one, seed by seed (if it is not among them: the first)"
    )
    vary: str | None = setting(
        None,
        "SETTING=V1,V2,...: every method again at each value of one train setting, as extra rows with the same "
        "seeds, each compared with its method's row (e.g. objective.alpha=0,1 or objective.proj-dim=512)",
    )
    teacher_arch: str | None = setting(
        None, "kd without --teacher: the teacher compare trains first (default r3d50; for -tiny students, their arch)"
    )
    teacher_method: TeacherMethod | None = setting(
        None, "kd without --teacher: how the teacher is trained (default baseline-aug; skd-srl for -tiny students)"
    )
    teacher_epochs: int | None = setting(
        None,
        "kd without --teacher: the teacher's epochs (default: --epochs; twice that for -tiny students)",
        at_least=1,
    )
    clips_per_video: int = clips_per_video_field()
    out: str = setting("runs/compare", "the comparison's folder: its table, plot, and a folder per run")
    val_fraction: float = val_fraction_field(0.1)  # compare's verdicts are not picked on test unless asked


def run_compare(cfg: CompareConfig, command: str) -> CompareReport:
    check_not_in_use(cfg.out)  # a second comparison into OUT fails at once, not after torch's seconds of import
    variants = variants_of(cfg, cfg.vary) if cfg.vary else ()
    from dali_skd.comparison import ComparisonPlan, format_table, run_comparison  # torch and DALI: once it may start

    methods = tuple(m.strip() for m in cfg.methods.split(",") if m.strip())
    plan = ComparisonPlan(
        cfg, methods, cfg.seeds, cfg.teacher_arch, cfg.teacher_epochs, cfg.clips_per_video, command=command,
        teacher_method=cfg.teacher_method, reference=cfg.reference, variants=variants,
    )  # fmt: skip
    report = run_comparison(plan)
    if os.environ.get("RANK", "0") == "0":  # one table for a torchrun job
        print(format_table(report))
    return report


# settings that change nothing a run learns (where the data and runs are, how the loader runs): no variant of them
_NOT_VARIED = {"out", "data", "train_shards", "eval_shards", "device", "log_every", "max_skipped_steps", "loader"}


def variants_of(cfg: TrainSettings, vary: str) -> tuple[Variant, ...]:
    """`SETTING=V1,V2,...` (`objective.alpha=0,1`, `arch=r3d18-tiny`): `cfg` with the setting at each value, checked
    as its flag is (type and limits). A value equal to `cfg`'s is its own rows, not a variant."""
    from dali_skd.comparison import Variant

    name, _, values = vary.partition("=")
    path = tuple(part.strip().replace("-", "_") for part in name.split("."))
    found = {p: kind for p, _, kind in leaves(TrainSettings) if p == path}
    if not values.strip() or not found:
        raise ConfigError(
            f"--vary {vary}: give SETTING=V1,V2,... with SETTING one of train's settings in dotted form, e.g. "
            "objective.alpha=0,1 or arch=r3d18-tiny"
        )
    if path[0] in _NOT_VARIED:
        raise ConfigError(f"--vary {vary}: {flag(path)} does not change what a run learns; vary a training setting")
    kind = found[path]
    dotted = ".".join(p.replace("_", "-") for p in path)
    base = {k: v for k, v in to_dict(cfg).items() if k in {f.name for f in dataclasses.fields(TrainSettings)}}
    variants = []
    for text in (v.strip() for v in values.split(",")):
        settings = copy.deepcopy(base)
        node = settings
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _convert(text, kind, f"--vary {dotted}={text}")
        try:
            varied = from_dict(TrainSettings, settings, "", flags=True)
        except ValueError as e:
            raise ConfigError(f"--vary {dotted}={text}: {e}") from e
        if to_dict(varied) == base:
            print(f"compare: {dotted}={text} is the comparison's own setting: its rows are the methods' own")
            continue
        variants.append(Variant(f"{dotted}={text}", varied))
    return tuple(variants)


def _convert(text: str, kind: type, where: str) -> object:
    """A value of a setting from its text, as its flag's click type reads it (a range: `LO HI`)."""
    converter, extra = click_type(kind)
    param_type = click.types.convert_type(converter)
    try:
        if "nargs" in extra:
            parts = text.split()
            if len(parts) != extra["nargs"]:
                raise click.BadParameter(f"it takes {extra['nargs']} numbers separated by spaces")
            return tuple(param_type.convert(p, None, None) for p in parts)
        return param_type.convert(text, None, None)
    except click.BadParameter as e:
        raise ConfigError(f"{where}: {e.message}") from e
