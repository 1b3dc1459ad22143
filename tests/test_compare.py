"""`cli.py compare` on the built-in synthetic set at toy sizes: the table, resuming a killed comparison, kd's
teacher, and runs that do not match the settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from clickit import invoke
from conftest import config_reads, unread

from dali_skd import comparison as compare_module
from dali_skd.cli_options import build_config
from dali_skd.commands.compare import CompareConfig, variants_of
from dali_skd.comparison import (
    CompareReport,
    ComparisonPlan,
    RunResult,
    Teacher,
    format_table,
    machines_line,
    summarise,
    teacher_choice,
    teacher_notes,
    validation_protocol,
)
from dali_skd.config import PreprocessConfig, TrainSettings
from dali_skd.data.holdout import protocol
from dali_skd.methods import METHODS
from dali_skd.runtime import machine_name
from dali_skd.signals import EXIT_STOPPED, STOP_SIGNALS, stop_requested
from preprocess.run import run_preprocess

REPO = Path(__file__).resolve().parents[1]
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
    # compare validates apart from test by default: one of each class's four training videos
    assert table["validation"].startswith("validation on 0.1 of each class of the training split, held out")
    assert table["inputs"].startswith("clips of 8 frames, 32x32 crops; frames stored at short side 128, jpeg")
    for run in table["runs"]:
        assert json.loads((out / "runs" / run["name"] / "metrics.jsonl").read_text().splitlines()[0])["val_videos"] == 2
        assert 0 <= run["val_top1"] <= 1 and run["cpu_seconds"] > 0 and run["load"] >= 0
        assert run["machine"] == machine_name(torch.device("cpu"))
    assert f"\nTrained on {machine_name(torch.device('cpu'))}\n" in (out / "table.md").read_text()
    [verdict] = table["verdicts"]  # skd-srl against the reference, seed by seed
    assert (verdict["first"], verdict["second"], verdict["seeds"]) == ("skd-srl", "baseline", [0, 1])
    markdown = (out / "table.md").read_text()
    assert "| skd-srl |" in markdown and "| baseline-seed1 |" in markdown and "--seeds 2" in markdown
    assert "mean and 95% confidence interval over 2 seeds" in markdown
    assert "Validation on 0.1 of each class of the training split, held out: test not used to pick best.pt" in markdown
    assert f"- {verdict['sentence']}" in markdown and "at 2 seeds" in verdict["sentence"]
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
    # the default teacher of -tiny students: trained with skd-srl (its arch and epochs given here)
    assert table["teacher"]["method"] == "skd-srl" and table["teacher"]["epochs"] == 2
    assert (table["epochs"], table["runs"][0]["epochs"]) == (1, 1)
    saved = json.loads((out / "runs" / "kd-seed0" / "config.json").read_text())
    assert saved["teacher"] == str(out / "runs" / "teacher" / "best.pt")
    markdown = (out / "table.md").read_text()
    assert "(kd teacher: r3d10-tiny, skd-srl, 2 epochs)" in markdown
    assert "kd: its teacher (r3d10-tiny, skd-srl, 2 epochs) reached" in markdown  # no baseline beside it to compare
    assert "no baseline ran beside it" in markdown
    # the kd run learnt from this teacher: it is never trained on, whatever the epochs asked
    refused = compare(data, out, *kd, "--teacher-epochs", "3", expect_error=True)
    assert "teacher was trained for 2 epochs, not 3: pass --teacher-epochs 2 to reuse it, or a new --out" in refused


def test_unknown_methods_are_refused(data: Path, tmp_path: Path) -> None:
    output = compare(data, tmp_path / "x", "--methods", "baseline,mine", expect_error=True)
    assert "unknown method(s) mine" in output


def test_the_miniature_preset_is_a_compare_config() -> None:
    preset = build_config(CompareConfig, {}, str(REPO / "presets" / "table2-miniature.json"))
    assert (preset.seeds, preset.arch, preset.epochs, preset.val_fraction) == (10, "r3d10-tiny", 30, 0.25)
    assert (preset.clip.length, preset.clip.frame_stride, preset.clip.crop) == (8, 2, 112)
    assert sorted(preset.methods.split(",")) == sorted(METHODS)  # all five of Table II


def test_the_teacher_choice_follows_the_students() -> None:
    assert teacher_choice("r3d10-tiny", 30) == Teacher("r3d10-tiny", "skd-srl", 60)
    assert teacher_choice("r3d18", 200) == Teacher("r3d50", "baseline-aug", 200)
    plan = ComparisonPlan(TrainSettings(arch="r3d10-tiny", epochs=30), ("kd",), teacher_method="baseline-aug")
    assert plan.teacher() == Teacher("r3d10-tiny", "baseline-aug", 60)


def report_with_teacher(teacher_val: float) -> CompareReport:
    def run(method: str, seed: int, val: float) -> RunResult:
        return RunResult(f"{method}-seed{seed}", method, seed, 0.4, 0.8, 0.3, 20, 30, 60.0, "r3d10-tiny", val_top1=val)

    runs = [run("baseline", s, v) for s, v in enumerate([0.5, 0.6])] + [run("kd", s, 0.3) for s in (0, 1)]
    teacher = replace(run("skd-srl", 0, teacher_val), name="teacher", arch="r3d18-tiny", epochs=60)
    report = CompareReport("cmd", "data", "r3d10-tiny", 30, runs, teacher, rows=summarise(runs, ["baseline", "kd"]))
    report.notes = teacher_notes(report)
    return report


def test_a_teacher_below_the_students_baseline_is_said_in_the_kd_row() -> None:
    below = report_with_teacher(0.3)
    [note] = below.notes
    assert note.startswith(
        "kd: its teacher (r3d18-tiny, skd-srl, 60 epochs) reached 30.0% validation top-1, the student's baseline "
        "55.0%: the teacher is BELOW the student's own baseline"
    )
    table = format_table(below)
    assert "| kd (teacher below the student's baseline) |" in table and f"Note: {note}." in table
    above = report_with_teacher(0.7)
    assert above.notes == [
        "kd: its teacher (r3d18-tiny, skd-srl, 60 epochs) reached 70.0% validation top-1, the student's baseline 55.0%"
    ]
    assert "| kd |" in format_table(above)
    level = report_with_teacher(0.55 - 1e-15)  # the baseline's mean, but for the last bits
    assert level.notes == [
        "kd: its teacher (r3d18-tiny, skd-srl, 60 epochs) reached 55.0% validation top-1, the student's baseline "
        "55.0%: level with it, not a better model by this measure"
    ]
    assert "| kd |" in format_table(level)


def test_the_table_says_how_the_runs_picked_best_pt() -> None:
    def run(validation: str) -> RunResult:
        return RunResult(
            "baseline-seed0", "baseline", 0, 0.4, 0.8, 0.3, 20, 30, 60.0, "r3d10-tiny", validation=validation
        )

    grouped = protocol(0.1, by_group=True)
    assert grouped.startswith("validation on 0.1 of each class's groups of clips (as the file names give them)")
    assert validation_protocol([run(grouped), run("")], 0.1) == grouped  # "": a run finished before it was kept
    assert validation_protocol([run("")], 0.1) == protocol(0.1)
    mixed = validation_protocol([run(grouped), run(protocol(0.1))], 0.1)
    assert mixed.startswith("the runs picked best.pt differently") and grouped in mixed and protocol(0.1) in mixed


def test_the_table_says_which_machines_trained_the_runs() -> None:
    def run(seed: int, machine: str) -> RunResult:
        return RunResult(
            f"baseline-seed{seed}", "baseline", seed, 0.4, 0.8, 0.3, 20, 30, 60.0, "r3d10", machine=machine
        )

    here = machine_name(torch.device("cpu"))
    assert here.endswith(f" cores, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    assert machines_line([run(0, ""), run(1, "")]) == []  # runs from before the machine was kept
    assert machines_line([run(0, here), run(1, here), run(2, "")]) == [f"Trained on {here}"]
    [warning] = machines_line([run(0, here), run(1, "NVIDIA H100 x 1, torch 2.13.0"), run(2, here)])
    assert warning.startswith("WARNING: the runs were trained on 2 kinds of machine: ")
    assert f"{here} (2 runs)" in warning and "NVIDIA H100 x 1, torch 2.13.0 (1 run)" in warning


@pytest.mark.slow
def test_vary_adds_rows_at_the_same_seeds_compared_with_their_methods(data: Path, tmp_path: Path) -> None:
    out, preset = tmp_path / "ablation", tmp_path / "preset.json"
    preset.write_text(json.dumps({"methods": "self-kd", "seeds": 2}))  # a preset: settings from a file
    args = ["--config", str(preset), "--vary", "objective.alpha=0,0.1", "--val-fraction", "0"]
    output = compare(data, out, *args)
    assert "objective.alpha=0.1 is the comparison's own setting" in output
    table = json.loads((out / "table.json").read_text())
    assert table["command"].startswith(f"python cli.py compare --config {preset} --")
    assert [r["name"] for r in table["runs"]] == [
        "self-kd-seed0", "self-kd-seed1", "self-kd@objective.alpha=0-seed0", "self-kd@objective.alpha=0-seed1",
    ]  # fmt: skip
    assert [row["row"] for row in table["rows"]] == ["self-kd", "self-kd [objective.alpha=0]"]
    assert [(v["first"], v["second"], v["seeds"]) for v in table["verdicts"]] == [
        ("self-kd [objective.alpha=0]", "self-kd", [0, 1])
    ]
    saved = json.loads((out / "runs" / "self-kd@objective.alpha=0-seed1" / "config.json").read_text())
    assert (saved["objective"]["alpha"], saved["seed"], saved["val_fraction"]) == (0.0, 1, 0.0)
    assert "Validation on the test split, the paper's protocol" in (out / "table.md").read_text()
    assert compare(data, out, *args).count("done before, reusing") == 4


def test_vary_names_a_train_setting_and_values_it_takes(data: Path, tmp_path: Path) -> None:
    base = CompareConfig(data=str(data))
    [variant] = variants_of(base, "objective.proj-dim=512,2048")  # 2048 is the comparison's own
    assert variant.name == "objective.proj-dim=512" and variant.settings.objective.proj_dim == 512
    assert variant.settings.objective.alpha == base.objective.alpha and type(variant.settings) is TrainSettings
    assert [v.settings.sampling.same_clip for v in variants_of(base, "sampling.same-clip=true")] == [True]
    assert [v.settings.arch for v in variants_of(base, "arch=r3d18-tiny")] == ["r3d18-tiny"]
    refused = {
        "objective.alpha": "give SETTING=V1,V2,...",
        "objective.gamma=1": "give SETTING=V1,V2,...",
        "loader.threads=1,2": "--loader.threads does not change what a run learns",
        "objective.alpha=-1": "--vary objective.alpha=-1: --objective.alpha is -1.0; it must be at least 0",
        "objective.alpha=much": "--vary objective.alpha=much: 'much' is not a valid float",
        "objective.proj-dim=1.5": "--vary objective.proj-dim=1.5: '1.5' is not a valid integer",
    }
    for vary, error in refused.items():
        with pytest.raises(ValueError, match=re.escape(error)):
            variants_of(base, vary)
    output = compare(data, tmp_path / "x", "--vary", "optim.lr=0", expect_error=True)
    assert "--vary optim.lr=0: --optim.lr is 0.0; it must be more than 0" in output


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
