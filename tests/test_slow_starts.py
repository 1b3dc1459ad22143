"""scripts/slow_starts.py: the row it gives a run, from a run folder as compare leaves it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slow_starts.py"


def load_script():
    spec = importlib.util.spec_from_file_location("slow_starts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run: Path, ce: list[float], lr: list[float], sim: list[float] | None) -> Path:
    run.mkdir(parents=True)
    lines = []
    for i, (c, r) in enumerate(zip(ce, lr, strict=True)):
        epoch = {"epoch": i + 1, "loss_ce": c, "lr": r} | ({} if sim is None else {"loss_sim": sim[i]})
        lines.append(json.dumps(epoch))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "result.json").write_text(json.dumps({"test_top1": 0.115, "best_epoch": 4}))
    return run


def test_a_run_at_chance_whose_lr_was_cut_is_told_apart_from_one_that_learnt(tmp_path: Path) -> None:
    slow_start = load_script().slow_start
    chance = math.log(12)
    stalled = write_run(
        tmp_path / "skd-srl-seed5", ce=[2.6, 2.5, 2.47, 2.3, 2.2], lr=[0.01, 0.01, 0.01, 0.001, 0.0001],
        sim=[-0.1, -0.5, -0.8, -0.85, -0.86],
    )  # fmt: skip
    assert slow_start(stalled, chance, first=3) == {
        "run": "skd-srl-seed5", "test_top1": 0.115, "at_chance": 3, "lr_cut": 4, "last_lr": 0.0001, "sim": -0.8,
        "best_epoch": 4,
    }  # fmt: skip
    learnt = write_run(tmp_path / "baseline-seed0", ce=[2.5, 2.0, 1.5], lr=[0.01] * 3, sim=None)
    row = slow_start(learnt, chance, first=15)  # fewer epochs than asked: the last one's figures
    assert (row["at_chance"], row["lr_cut"], row["sim"]) == (1, None, None)
