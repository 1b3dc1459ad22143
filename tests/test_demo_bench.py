"""The quickstart's demo and the throughput benchmark, at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import config_reads, unread

from dali_skd.commands import bench
from dali_skd.commands.bench import BenchConfig, Rate
from dali_skd.commands.demo import DemoConfig, DemoPreset, plan_epochs, run_demo
from dali_skd.methods import MethodOutput
from dali_skd.step import TrainStep

METHODS = ("skd-srl", "baseline")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_against_chance(tmp_path: Path, capsys) -> None:
    preset = DemoPreset(classes=2, videos_per_class=(3, 3), epochs=(1, 2), batch_size=2, eval_clips=2)
    cfg = DemoConfig(out=str(tmp_path / "demo"), compare=True, json=str(tmp_path / "demo.json"), minutes=1)
    with config_reads() as reads:
        report = run_demo(cfg, preset)
    assert unread(DemoConfig, reads) == []
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"device", "method", "test_top1", "chance", "seconds", "rows", "plan"} <= set(saved)
    assert saved["method"] == "skd-srl" and saved["chance"] == 0.5 and saved["device"] == "cpu"
    assert [row["method"] for row in saved["rows"]] == ["skd-srl", "baseline"]
    plan = saved["plan"]
    assert plan["videos_per_class"] == 3 and plan["epochs"] in (1, 2) and set(plan["epoch_seconds"]) == set(METHODS)
    assert all(plan["run_seconds"][m] > 0 and plan["step_seconds_on_shards"][m] > 0 for m in METHODS)
    out, err = capsys.readouterr()  # the plan and the table printed; the training's lines logged (to stderr)
    assert "chance 50.0%" in out and f"a training step on random clips takes {plan['step_seconds']:.2f} s" in out
    assert "s of warm-up (pipelines built, first steps): skd-srl " in out
    assert f"training {plan['epochs']} epochs (1 to 2), " in out
    # one story: the plan, a line an epoch (of the epochs planned, none before), one table, what to run next
    epochs = [line.split(":")[0] for line in err.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"epoch {e}/{plan['epochs']}" for _ in METHODS for e in range(1, plan["epochs"] + 1)]
    assert "--resume" not in out + err and "| skd-srl |" not in out and out.count("test top-1") == 1
    assert err.index("training skd-srl") < err.index("training baseline")
    assert out.index("demo: 2 classes") < out.index("test top-1") < out.index("next:")
    assert "python cli.py eval --data " in out.split("next:")[1]
    # the comparison engine ran the plan: compare's table, with the demo's command
    table = json.loads((tmp_path / "demo" / "table.json").read_text())
    assert [r["name"] for r in table["runs"]] == ["skd-srl-seed0", "baseline-seed0"] and table["epochs"] == plan[
        "epochs"
    ]
    assert table["command"].startswith("python cli.py demo --out ") and table["command"].endswith("--compare")
    assert "| skd-srl |" in (tmp_path / "demo" / "table.md").read_text()
    # a second run continues from what is there: same plan, nothing generated, preprocessed or trained again
    again = run_demo(DemoConfig(out=str(tmp_path / "demo"), minutes=1, compare=True), preset)
    assert again["plan"] == plan and again["rows"][0]["test_top1"] == saved["rows"][0]["test_top1"]
    assert "compare: skd-srl-seed0 done before, reusing" in capsys.readouterr().err


def test_demo_plans_epochs_to_fill_the_budget() -> None:
    preset = DemoPreset(epochs=(8, 16), eval_clips=5)
    # 20 s + 10 s a steady epoch; each run's set-up and final evaluation 5 s and 2.5 s
    runs = {"skd-srl": 5.0, "baseline": 2.5}
    assert plan_epochs({"skd-srl": 20.0, "baseline": 10.0}, runs, 307.5, preset) == (10, 10)
    assert plan_epochs({"skd-srl": 20.0, "baseline": 10.0}, runs, 307.0, preset) == (9, 9)  # 299.5 s to train
    assert plan_epochs({"skd-srl": 20.0}, {"skd-srl": 0.0}, 10_000.0, preset) == (16, 500)  # no more than worth it
    assert plan_epochs({"skd-srl": 20.0}, {"skd-srl": 0.0}, 60.0, preset) == (8, 3)  # no fewer than learn well


@pytest.mark.slow
def test_bench_measures_both_loaders_and_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []  # the benchmark times the trainer's own step
    trainer_step = TrainStep.__call__

    def counted(self: TrainStep, views: list[torch.Tensor], labels: torch.Tensor) -> MethodOutput:
        steps.append(len(labels))
        return trainer_step(self, views, labels)

    monkeypatch.setattr(TrainStep, "__call__", counted)
    videos = [(noise_frames(12, seed=i), i % 2) for i in range(6)]
    data = write_dataset(tmp_path / "data", {"train": videos}, ["a", "b"], per_shard=2)
    out = tmp_path / "bench.json"
    result = invoke(
        "bench", "--data", str(data), "--device", "cpu", "--seconds", "1", "--repeats", "2", "--workers", "1",
        "--loaders", "host,dali,dataloader", "--rounds", "1",
        "--batch-size", "4", "--clip.length", "8", "--clip.crop", "32", "--sampling.shuffle-buffer", "2",
        "--train.arch", "r3d10-tiny", "--train.batch-size", "2", "--json", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["device"] and set(report["loaders"]) == {"host", "dali", "dataloader"}
    for loader in report["loaders"].values():
        assert loader["samples_per_s"] > 0 and len(loader["windows"]) == 2 and loader["cpu_us_per_sample"] > 0
        assert loader["frames_per_s"] == loader["samples_per_s"] * 16
    # the host side alone, into a pass-through pipeline, outruns the whole loader that also decodes
    assert report["loaders"]["host"]["samples_per_s"] > report["loaders"]["dali"]["samples_per_s"]
    assert f"dali / dataloader: {report['ratio_dali_over_dataloader']:.2f}x" in result.output  # the JSON's figure
    train = report["train"]
    assert len(steps) >= 8 and set(steps) == {2}  # a warm-up of 2 and 2 windows, on synthetic and on real batches
    assert train["arch"] == "r3d10-tiny" and train["synthetic_samples_per_s"] > 0 and 0 <= train["data_wait"] <= 1
    assert "dali / dataloader" in result.output and "training r3d10-tiny" in result.output


def test_bench_rejects_unknown_loaders(tmp_path: Path) -> None:
    result = invoke("bench", "--data", str(tmp_path), "--loaders", "dali,mine", expect_error=True)
    assert "unknown loader(s) mine" in result.output


def test_bench_reports_dali_over_dataloader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    data = write_dataset(tmp_path / "data", {"train": [(noise_frames(8, seed=0), 0)]}, ["a"])
    for name, rate in {"dali": 300.0, "dataloader": 100.0}.items():
        measured = Rate(rate, [rate], 1.0, 1.0)
        monkeypatch.setattr(bench, f"bench_{name}", lambda cfg, device, precision, measured=measured: measured)
    cfg = BenchConfig(data=str(data), device="cpu", loaders="dataloader,dali")
    report = bench.run_bench(cfg)
    assert report["ratio_dali_over_dataloader"] == 3.0
    assert "dali / dataloader: 3.00x" in capsys.readouterr().out
