"""`curves.png` of a run directory, drawn from its metrics.jsonl: losses by term, accuracy, learning rate; and the
confusion matrix `cli.py eval --json` draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: runs have no display
import matplotlib.pyplot as plt

from dali_skd.errors import MissingInput
from dali_skd.files import read_jsonl


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MissingInput(f"no metrics.jsonl in {run_dir}: is it the --out directory of `cli.py train`?")
    return parse_metrics(path)[0]


def parse_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The rows of a metrics.jsonl, and its last line if that one was cut short (a run killed, or a disk full,
    while writing it): it is left out. Any other unreadable line is an error that names it."""
    return read_jsonl(path, "a metrics line", _metrics_row)


def _metrics_row(value: Any) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("epoch"), int):
        raise ValueError("no epoch number")
    return value


def plot_curves(run_dir: str | Path) -> Path:
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for key in sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss_")}):
        ax_loss.plot(epochs, [r.get(key) for r in rows], label=key, lw=2 if key == "loss" else 1)
    ax_loss.set(title="training loss by term", xlabel="epoch")
    ax_loss.legend()
    for key, style in (("train_top1", "--"), ("val_top1", "-"), ("val_clip_top1", ":")):
        if key in rows[0]:
            ax_acc.plot(epochs, [100 * r[key] for r in rows], style, label=key)
    ax_acc.set(title="top-1 accuracy (%)", xlabel="epoch", ylim=(0, 100))
    ax_acc.legend()
    ax_lr.semilogy(epochs, [r["lr"] for r in rows])
    ax_lr.set(title="learning rate", xlabel="epoch")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    path = Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path, title: str) -> Path:
    """The confusion matrix with each row normalised (row: where the videos of one true class went), every class
    named on both axes. The figure grows with the class count, so 101 names stay legible in a small font."""
    counts = np.asarray(confusion, np.float64)
    videos = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, videos, out=np.zeros_like(counts), where=videos > 0)
    n = len(classes)
    side = max(5.0, 2.5 + 0.16 * n)  # inches: 0.16 per class leaves room for a 6-point name
    font = 9 if n <= 30 else 6
    fig, ax = plt.subplots(figsize=(side + 1.0, side), constrained_layout=True)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, shrink=0.5, label="share of the true class's videos")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
