"""`--track.to wandb|mlflow`, offline: W&B's offline mode (its run files read back) and an MLflow folder store (read
back with MlflowClient) hold what metrics.jsonl holds, epoch by epoch; a resumed run continues the same tracked run;
a comparison's runs are grouped; eval logs into the run it evaluates; only rank 0 logs; a tracker that fails does not
stop training; a tracker that is not installed is one line naming its extra."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import run_two_ranks

from dali_skd.config import ClipConfig, LoaderConfig, SamplingConfig, TrackConfig, TrainConfig, to_dict
from dali_skd.training import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(12)]
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, {"train": videos[:8], "test": videos[8:]}, ["a", "b"], per_shard=2)


def tiny(data: Path, out: Path, to: str, **kw) -> TrainConfig:
    return TrainConfig(
        **{
            "arch": "r3d10-tiny", "data": str(data), "out": str(out), "epochs": 1, "batch_size": 4, "device": "cpu",
            "clip": ClipConfig(length=8, crop=32), "sampling": SamplingConfig(shuffle_buffer=2),
            "loader": LoaderConfig(threads=2), "track": TrackConfig(to=to), **kw,
        }
    )  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An MLflow store in a folder (MLflow 3 keeps folder stores for those who opt in)."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return store


def mlflow_runs(store: Path, experiment: str = "dali-skd") -> dict[str, Any]:
    """The runs of `experiment` in `store`, by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    found = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])}


def mlflow_history(store: Path, run: Any, name: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(store.as_uri()).get_metric_history(run.info.run_id, name)]


# -- W&B's offline run files: a log of 32 KiB blocks of records, each a wandb_internal_pb2.Record -------------------


def wandb_records(run_file: Path) -> list[Any]:
    """The records of an offline run's .wandb file (its header, then LevelDB's log format: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending, at = [], b"", header
    while at + header <= len(data):
        if block - at % block < header:  # a block's tail too short for a record header is padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + header])
        if kind == 0:
            break
        pending += data[at + header : at + header + length]
        at += header + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(run_file: Path, timeout: float = 60) -> list[Any]:
    """The records of a finished offline run: W&B's service process writes them after `finish` returns, up to the
    run's exit record."""
    deadline = time.monotonic() + timeout
    while (records := wandb_records(run_file))[-1:] == [] or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout} s"
        time.sleep(0.2)
    return records


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """What the offline runs under RUN_DIR/wandb/ hold, in order: their ids, history rows, summary and config."""

    def items(update: Any) -> dict[str, Any]:
        named = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}
        return {k: v for k, v in named.items() if not k.startswith("_")}  # W&B's own: _step, _runtime, ...

    found: dict[str, Any] = {"ids": [], "groups": [], "history": [], "summary": {}, "config": {}, "files": set()}
    for offline in sorted((run_dir / "wandb").glob("offline-run-*")):
        found["files"] |= {p.name for p in (offline / "files").iterdir()}
        for record in finished_records(next(offline.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["ids"].append(record.run.run_id)
                found["groups"].append(record.run.run_group)
                found["config"].update(items(record.run.config.update))
            elif kind == "history":
                found["history"].append(items(record.history.item))
            elif kind == "summary":
                found["summary"].update(items(record.summary.update))
    return found


# -- the trainer ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_offline_holds_every_epoch_and_a_resume_continues_its_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    train(tiny(data, out, "wandb"))
    train(tiny(data, out, "wandb", epochs=2, resume=True))
    logged = wandb_run(out)
    record = json.loads((out / "tracker.json").read_text())["wandb"]
    assert logged["ids"] == [record["id"]] * 2 and record["logged"] == 2  # one tracked run, continued
    assert logged["history"] == metrics(out)  # every epoch, every value, the names of metrics.jsonl
    assert logged["config"]["optim"]["lr"] == 0.01 and logged["config"]["epochs"] == 2  # as resumed
    assert logged["summary"]["best_val_top1"] == metrics(out)[-1]["best_top1"]
    assert "curves.png" in logged["files"]


@pytest.mark.slow
def test_mlflow_holds_every_epoch_a_resume_continues_its_run_and_eval_joins_it(
    data: Path, tmp_path: Path, mlflow_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(tiny(data, out, "mlflow"))
    train(tiny(data, out, "mlflow", epochs=2, resume=True))
    runs = mlflow_runs(mlflow_store)
    assert list(runs) == ["run"] and runs["run"].info.status == "FINISHED"  # one tracked run, continued
    rows = metrics(out)
    for name in rows[0]:
        assert mlflow_history(mlflow_store, runs["run"], name) == [(r["epoch"], float(r[name])) for r in rows], name
    assert runs["run"].data.params["optim.lr"] == "0.01" and runs["run"].data.params["clip.crop"] == "32"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store.as_uri())
    assert {a.path for a in client.list_artifacts(runs["run"].info.run_id)} == {"config.json", "curves.png"}

    json_out = tmp_path / "eval.json"
    invoke("eval", "--data", str(data), "--checkpoint", str(out / "best.pt"), "--clip.crop", "32", "--device", "cpu",
           "--clips-per-video", "2", "--json", str(json_out), "--track.to", "mlflow")  # fmt: skip
    figures = json.loads(json_out.read_text())
    run = mlflow_runs(mlflow_store)["run"]  # the run it evaluates, not a new one
    assert run.data.metrics["eval/test/video_top1"] == figures["video_top1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "eval.predictions.jsonl", "eval.confusion.png", "eval-config.json"} <= artifacts

    # another store (MLFLOW_TRACKING_URI changed): a new run there, with every epoch so far
    other = tmp_path / "other"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other.as_uri())
    train(tiny(data, out, "mlflow", epochs=3, resume=True))
    moved = mlflow_runs(other)["run"]
    assert [step for step, _ in mlflow_history(other, moved, "val_top1")] == [1, 2, 3]


@pytest.mark.slow
def test_a_comparisons_runs_are_grouped(data: Path, tmp_path: Path, mlflow_store: Path) -> None:
    out = tmp_path / "cmp"
    invoke("compare", "--data", str(data), "--out", str(out), "--methods", "baseline,baseline-aug", "--seeds", "1",
           "--arch", "r3d10-tiny", "--epochs", "1", "--batch-size", "4", "--clip.length", "8", "--clip.crop", "32",
           "--sampling.shuffle-buffer", "2", "--loader.threads", "2", "--device", "cpu", "--clips-per-video", "1",
           "--track.to", "mlflow", "--track.project", "ablation")  # fmt: skip
    runs = mlflow_runs(mlflow_store, "ablation")
    assert set(runs) == {"cmp", "baseline-seed0", "baseline-aug-seed0"}
    group = runs["cmp"]
    table = json.loads((out / "table.json").read_text())
    for result in table["runs"]:
        child = runs[result["name"]]
        assert child.data.tags["mlflow.parentRunId"] == group.info.run_id
        assert child.data.metrics["test_top1"] == result["test_top1"]
        assert mlflow_history(mlflow_store, child, "epoch") == [(1, 1.0)]
    assert group.data.metrics["baseline/top1_mean"] == table["rows"][0]["top1_mean"]
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(mlflow_store.as_uri()).list_artifacts(group.info.run_id)}
    assert {"table.md", "table.json", "compare.png"} <= artifacts


def test_wandb_groups_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_skd.tracking import open_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    with open_tracker(TrackConfig(to="wandb", group="ablation"), tmp_path, "skd-srl-seed0", {"a": 1}, "train") as t:
        t.summary({"test_top1": 0.5})
    logged = wandb_run(tmp_path)
    assert logged["groups"] == ["ablation"] and logged["summary"]["test_top1"] == 0.5


RANK_SCRIPT = """
import json, sys
from dali_skd.config import TrainConfig, from_dict
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.training import Trainer
ctx = init_distributed("cpu")
Trainer.from_config(from_dict(TrainConfig, json.loads(sys.argv[1])), ctx).run()
shutdown(ctx)
"""


@pytest.mark.slow
def test_only_rank_0_logs(data: Path, tmp_path: Path, mlflow_store: Path) -> None:
    out = tmp_path / "ddp"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_two_ranks(script, json.dumps(to_dict(tiny(data, out, "mlflow", batch_size=2))))
    runs = mlflow_runs(mlflow_store)
    assert list(runs) == ["ddp"]
    assert mlflow_history(mlflow_store, runs["ddp"], "val_top1") == [(1, metrics(out)[0]["val_top1"])]


@pytest.mark.slow
def test_a_tracker_failing_mid_run_does_not_stop_it(
    data: Path, tmp_path: Path, mlflow_store: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from dali_skd.tracking import MlflowTracker

    def down(*args: Any) -> None:
        raise ConnectionError("the tracking server is gone")

    monkeypatch.setattr(MlflowTracker, "_log", down)  # the run opened; its first epoch's line fails
    with caplog.at_level(logging.WARNING, logger="dali_skd.tracking"):
        summary = train(tiny(data, tmp_path / "run", "mlflow", epochs=2))
    assert summary.epochs == 2 and len(metrics(tmp_path / "run")) == 2
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "logging failed (the tracking server is gone); the run goes on without it" in said[0]
    assert json.loads((tmp_path / "run" / "tracker.json").read_text())["mlflow"]["logged"] == 0  # a resume logs them


@pytest.mark.slow
def test_a_tracker_not_installed_or_not_named_is_one_line(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    result = invoke("train", "--data", str(data), "--out", str(tmp_path / "run"), "--track.to", "wandb",
                    "--device", "cpu", "--arch", "r3d10-tiny", "--clip.crop", "32", expect_error=True)  # fmt: skip
    assert result.output == (
        "Error: --track.to wandb needs the extra 'wandb' (wandb is not installed): pip install -e '.[wandb]' in the "
        "clone of dali-skd (or pip install 'dali-skd[wandb]')\n"
    )
    assert not (tmp_path / "run" / "last.pt").exists()
    result = invoke("eval", "--data", str(data), "--track.project", "mine", expect_error=True)
    assert "--track.project and --track.group name a W&B or MLflow run: add --track.to wandb" in result.output


@pytest.mark.parametrize(
    "record",
    [[], {"wandb": {"id": "../../x", "project": "p", "logged": 1}}, {"neptune": {}}, {"mlflow": {"run_id": "a"}}],
)
def test_a_damaged_tracker_record_is_a_one_line_error(tmp_path: Path, record: Any) -> None:
    from dali_skd.tracking import read_record

    (tmp_path / "tracker.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="is not a tracked run's record: delete it to log to new tracked runs"):
        read_record(tmp_path)
