"""`cli.py plot RUN_DIR`: redraws RUN_DIR/curves.png from its metrics.jsonl (`plot.plot_curves`)."""

from __future__ import annotations

from dali_skd.plot import plot_curves


def run_plot(run_dir: str) -> None:
    print(plot_curves(run_dir))
