"""`cli.py train`: one training run (`dali_skd/training.py`). Its config is the saved run's schema,
`config.TrainConfig`."""

from __future__ import annotations

import os

from dali_skd.config import TrainConfig
from dali_skd.files import check_not_in_use


def run_train(cfg: TrainConfig) -> None:
    check_not_in_use(cfg.out)  # a second run into OUT fails at once, not after torch's seconds of import
    from dali_skd.training import train  # torch and DALI: only once the run may start

    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # one summary for a torchrun job
        print(summary.format())
