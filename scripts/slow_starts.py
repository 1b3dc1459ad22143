"""Why did a seed of a comparison fall behind? Each run of a `compare` folder, from its metrics.jsonl, result.json
and best.pt: how many of its first epochs the training cross-entropy stayed at chance (at least 98% of ln K, K the
classes: the classifier had learnt nothing yet), the epoch its lr was first cut (the plateau schedule divides it by
--optim.lr-factor after --optim.lr-patience epochs without a better validation top-1), its last lr, its Siamese
loss (skd-srl: -1 is two views' projections in one direction) and its test top-1.

    python scripts/slow_starts.py runs/table2-mini [--first 15]

A run that sat at chance while its validation top-1 stood still has its lr cut before it starts learning, and
rarely recovers in a short budget: that is a slow start and the schedule, not a collapse of the Siamese branch
(`scripts/siamese_check.py RUN` measures that one).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from dali_skd.checkpoint import TrainedRun


def slow_start(run: Path, chance: float, first: int) -> dict[str, Any]:
    """One run's row: its test top-1, the epochs of its first `first` whose cross-entropy stayed at `chance`, the
    epoch of its first lr cut (None: never cut), its last lr, its Siamese loss at epoch `first` (None: no Siamese
    term) and its best epoch."""
    result = json.loads((run / "result.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    at_first = epochs[min(first, len(epochs)) - 1]
    return {
        "run": run.name,
        "test_top1": result["test_top1"],
        "at_chance": sum(e["loss_ce"] >= 0.98 * chance for e in epochs[:first]),
        "lr_cut": next((e["epoch"] for e in epochs if e["lr"] < epochs[0]["lr"] * (1 - 1e-6)), None),
        "last_lr": epochs[-1]["lr"],
        "sim": at_first.get("loss_sim"),
        "best_epoch": result["best_epoch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compare_dir", type=Path, help="the --out directory of a compare")
    parser.add_argument("--first", type=int, default=15, help="the first epochs looked at for a slow start")
    args = parser.parse_args()

    runs = sorted(d for d in (args.compare_dir / "runs").iterdir() if (d / "result.json").is_file())
    if not runs:
        raise SystemExit(f"{args.compare_dir}/runs holds no finished run (no runs/*/result.json)")
    chance = math.log(len(TrainedRun.load(runs[0] / "best.pt").classes))
    print(f"{len(runs)} runs; chance cross-entropy ln K = {chance:.3f}")
    print(f"| run | test top-1 (%) | epochs at chance, of the first {args.first} | first lr cut (epoch) | last lr "
          f"| Siamese loss, epoch {args.first} | best epoch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        row = slow_start(run, chance, args.first)
        sim = "-" if row["sim"] is None else f"{row['sim']:.2f}"
        print(f"| {row['run']} | {100 * row['test_top1']:.1f} | {row['at_chance']} | {row['lr_cut'] or '-'} "
              f"| {row['last_lr']:g} | {sim} | {row['best_epoch']} |")  # fmt: skip


if __name__ == "__main__":
    main()
