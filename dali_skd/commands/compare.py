"""`cli.py compare`: the paper's Table II as one command, a plan for the comparison engine (`comparison.py`):
every method x seed trained with the same settings (any `train` flag but --method and --seed applies to all), each
best checkpoint evaluated as `eval` does, and OUT/table.md, table.json and compare.png written."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dali_skd.config import TrainSettings, clips_per_video_field
from dali_skd.files import check_not_in_use
from dali_skd.settings import setting, settings

if TYPE_CHECKING:
    from dali_skd.comparison import CompareReport


@settings
class CompareConfig(TrainSettings):
    """`cli.py compare`: what to compare, and the settings every run shares."""

    methods: str = setting("baseline,baseline-aug,kd,self-kd,skd-srl", "methods to compare, comma-separated")
    seeds: int = setting(3, "runs per method, with seeds 0, 1, ...", at_least=1)
    teacher_arch: str | None = setting(
        None, "kd without --teacher: the teacher compare trains first (default r3d50; r3d50-tiny for -tiny students)"
    )
    teacher_epochs: int | None = setting(
        None, "kd without --teacher: the teacher's epochs (default: --epochs)", at_least=1
    )
    clips_per_video: int = clips_per_video_field()
    out: str = setting("runs/compare", "the comparison's folder: its table, plot, and a folder per run")


def run_compare(cfg: CompareConfig, command: str) -> CompareReport:
    check_not_in_use(cfg.out)  # a second comparison into OUT fails at once, not after torch's seconds of import
    from dali_skd.comparison import ComparisonPlan, run_comparison  # torch and DALI: only once it may start

    methods = tuple(m.strip() for m in cfg.methods.split(",") if m.strip())
    plan = ComparisonPlan(
        cfg, methods, cfg.seeds, cfg.teacher_arch, cfg.teacher_epochs, cfg.clips_per_video, command=command
    )
    return run_comparison(plan)
