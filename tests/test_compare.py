"""`cli.py compare` on the built-in synthetic set at toy sizes: the table, resuming a killed comparison, kd's
teacher, and runs that do not match the settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from clickit import invoke
from conftest import config_reads, unread

from dali_skd import comparison as compare_module
from dali_skd.commands.compare import CompareConfig
from dali_skd.config import PreprocessConfig
from dali_skd.signals import EXIT_STOPPED, STOP_SIGNALS, stop_requested
from preprocess.run import run_preprocess

TINY = ["--arch", "r3d10-tiny", "--epochs", "1", "--batch-size", "2", "--clip.length", "8", "--clip.crop", "32",
        "--clips-per-video", "2", "--sampling.shuffle-buffer", "2", "--loader.threads", "2",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The normal synthetic set: 2 classes of 5 videos (4 for training, 1 for testing)."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = PreprocessConfig(
        dataset="synthetic", root=str(root / "videos"), out=str(root / "data"), classes=2, videos_per_class=5,
        workers=2,
    )  # fmt: skip
    run_preprocess(cfg, progress=False)
    return root / "data"


def compare(data: Path, out: Path, *args: str, expect_error: bool = False) -> str:
    return invoke("compare", "--data", str(data), "--out", str(out), *TINY, *args, expect_error=expect_error).output


@pytest.mark.slow
def test_compare_writes_the_table_and_a_killed_comparison_trains_only_what_is_missing(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    compare(data, out, "--methods", "baseline,skd-srl", "--seeds", "2")
    table = json.loads((out / "table.json").read_text())
    assert [r["name"] for r in table["runs"]] == ["baseline-seed0", "baseline-seed1", "skd-srl-seed0", "skd-srl-seed1"]
    assert [(row["method"], row["runs"]) for row in table["rows"]] == [("baseline", 2), ("skd-srl", 2)]
    for row in table["rows"]:
        mine = [r["test_top1"] for r in table["runs"] if r["method"] == row["method"]]
        assert row["top1_mean"] == pytest.approx(sum(mine) / 2)
        assert row["top1_std"] == pytest.approx(abs(mine[0] - mine[1]) / 2**0.5)
    assert "--methods baseline,skd-srl" in table["command"] and table["teacher"] is None
    markdown = (out / "table.md").read_text()
    assert "| skd-srl |" in markdown and "| baseline-seed1 |" in markdown and "--seeds 2" in markdown
    assert (out / "compare.png").stat().st_size > 10_000

    # killed after baseline-seed1 was trained but before it was evaluated, and before skd-srl-seed1 started
    (out / "runs" / "baseline-seed1" / "result.json").unlink()
    shutil.rmtree(out / "runs" / "skd-srl-seed1")
    kept = {name: (out / "runs" / name / "last.pt").stat().st_mtime_ns for name in ("baseline-seed0", "baseline-seed1")}
    output = compare(data, out, "--methods", "baseline,skd-srl", "--seeds", "2")
    assert output.count("done before, reusing") == 2  # baseline-seed0, skd-srl-seed0
    assert "training baseline-seed1" in output and "training skd-srl-seed1" in output
    for name, mtime in kept.items():  # baseline-seed1 was only evaluated: its weights are those of the first run
        assert (out / "runs" / name / "last.pt").stat().st_mtime_ns == mtime
    assert (out / "runs" / "skd-srl-seed1" / "result.json").exists()
    again = json.loads((out / "table.json").read_text())
    assert [r["test_top1"] for r in again["runs"]][:3] == [r["test_top1"] for r in table["runs"]][:3]

    refused = compare(data, out, "--methods", "baseline", "--seeds", "1", "--optim.lr", "0.5", expect_error=True)
    assert "baseline-seed0 was trained with other settings (optim.lr: 0.01 then, 0.5 now)" in refused

    # more epochs: a finished run is trained on from its last.pt, then evaluated again; fewer: refused
    output = compare(data, out, "--methods", "baseline", "--seeds", "1", "--epochs", "2")
    assert "baseline-seed0 was trained for 1 epochs; training it on to 2" in output
    run = out / "runs" / "baseline-seed0"
    assert json.loads((run / "result.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "table.json").read_text())["epochs"] == 2
    refused = compare(data, out, "--methods", "baseline", "--seeds", "1", expect_error=True)
    assert "was trained for 2 epochs, not 1: pass --epochs 2 to reuse it, or a new --out" in refused


@pytest.mark.slow
def test_kd_gets_a_teacher_trained_first(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "kd"
    kd = ["--methods", "kd", "--seeds", "1", "--teacher-arch", "r3d10-tiny"]
    with config_reads() as reads:
        output = compare(data, out, *kd, "--teacher-epochs", "2")
        compare(data, tmp_path / "srl", "--methods", "skd-srl", "--seeds", "1")  # the loss terms kd leaves out
    assert unread(CompareConfig, reads) == []  # compare offers no flag that does nothing
    assert output.index("training teacher") < output.index("training kd-seed0")
    table = json.loads((out / "table.json").read_text())
    assert table["teacher"]["method"] == "baseline-aug" and table["teacher"]["epochs"] == 2
    assert (table["epochs"], table["runs"][0]["epochs"]) == (1, 1)
    saved = json.loads((out / "runs" / "kd-seed0" / "config.json").read_text())
    assert saved["teacher"] == str(out / "runs" / "teacher" / "best.pt")
    assert "(kd teacher: r3d10-tiny, baseline-aug, 2 epochs)" in (out / "table.md").read_text()
    # the kd run learnt from this teacher: it is never trained on, whatever the epochs asked
    refused = compare(data, out, *kd, "--teacher-epochs", "3", expect_error=True)
    assert "teacher was trained for 2 epochs, not 3: pass --teacher-epochs 2 to reuse it, or a new --out" in refused


def test_unknown_methods_are_refused(data: Path, tmp_path: Path) -> None:
    output = compare(data, tmp_path / "x", "--methods", "baseline,mine", expect_error=True)
    assert "unknown method(s) mine" in output


@pytest.mark.slow
def test_a_signal_stops_compare_between_runs_before_the_table_and_the_same_command_finishes(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    evaluate = compare_module.evaluate_checkpoint

    def evaluated_then_signalled(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's, as the first run's evaluation ends
        deadline = time.monotonic() + 30
        while stop_requested() is None and time.monotonic() < deadline:  # seen by a thread, a moment later
            time.sleep(0.01)
        return result

    monkeypatch.setattr(compare_module, "evaluate_checkpoint", evaluated_then_signalled)
    result = invoke("compare", "--data", str(data), "--out", str(out), *TINY, "--seeds", "2", "--methods", "baseline",
                    expect_error=True)  # fmt: skip
    assert result.exit_code == EXIT_STOPPED
    assert "compare stopped by SIGTERM before baseline-seed1; run the same command again to continue" in result.output
    assert (out / "runs" / "baseline-seed0" / "result.json").exists() and not (out / "runs" / "baseline-seed1").exists()
    assert not (out / "table.md").exists() and not (out / "table.json").exists()
    # the CLI, its work saved, is on its way out with 75: a signal now changes nothing (tests/test_signals.py)
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == [signal.SIG_IGN] * len(STOP_SIGNALS)
    monkeypatch.undo()
    output = compare(data, out, "--seeds", "2", "--methods", "baseline")
    assert "baseline-seed0 done before, reusing" in output and "training baseline-seed1" in output
    assert [r["name"] for r in json.loads((out / "table.json").read_text())["runs"]] == [
        "baseline-seed0",
        "baseline-seed1",
    ]
