"""Experiment trackers: with `--track.to wandb` or `mlflow`, a run's config, every epoch's metrics line (the names of
metrics.jsonl), curves.png and its final evaluation go to Weights & Biases or MLflow as well as to the run's folder
(TensorBoard's tb/ is written whatever the setting). Only rank 0 logs. `open_tracker` gives the `Tracker` the trainer
(`track_training`), `compare` and `eval` call.

RUN_DIR/tracker.json records each tracker's run and how many epochs it holds,

    {"wandb": {"id": "3kq8x1zt", "project": "dali-skd", "logged": 12},
     "mlflow": {"run_id": "9f3c...", "tracking_uri": "http://mlflow:5000", "logged": 12}}

so that a resumed run continues the same tracked run, and the epochs of metrics.jsonl it lacks (a run tracked only
from a resume on, an epoch whose line was written just before a kill) are logged when it opens. A tracker that fails
once training runs (a server gone) is said in one line and left alone: the run goes on, and its next resume logs the
epochs the tracker missed. One that cannot open stops the command before it starts.

Groups (`--track.group`, a comparison's folder name): a W&B group; in MLflow, children of a run named for the group,
which also holds the comparison's table (compare's own tracked run, job "compare").
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from dali_skd.config import TrackConfig, TrainConfig, to_dict
from dali_skd.errors import ConfigError, InputError, RunFailed
from dali_skd.extras import MissingExtra, require
from dali_skd.files import write_atomic
from dali_skd.plot import parse_metrics

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "dali-skd"
RECORD = "tracker.json"
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what W&B and MLflow run ids look like
Ending = Literal["finished", "stopped", "failed"]  # stopped: by a signal, to be resumed


class Tracker:
    """What the trainer, compare and eval log to; this one logs nothing (`--track.to tensorboard`, and the ranks
    but 0). A context manager: it closes as failed if its block raises."""

    kind: ClassVar[str] = "tensorboard"

    def epoch(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl line, at step `row["epoch"]`."""

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """The lines of metrics.jsonl the tracked run does not hold yet."""

    def summary(self, figures: dict[str, float]) -> None:
        """Figures of the run as a whole (a final evaluation)."""

    def files(self, *paths: Path) -> None:
        """Files to keep with the run (curves.png, a table)."""

    def close(self, ending: Ending = "finished") -> None:
        """Ends the tracked run (later calls do nothing)."""

    def finish(self, figures: dict[str, float], *paths: Path) -> None:
        self.summary(figures)
        self.files(*paths)
        self.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _: Any) -> None:
        self.close("finished" if error is None else "failed")


def open_tracker(track: TrackConfig, run_dir: Path | None, name: str, config: dict[str, Any], job: str) -> Tracker:
    """The tracker `track` asks for, its run named `name` (a new one, or the one RUN_DIR/tracker.json records for it,
    continued); `config` is logged with it. `run_dir` None: a new run, recorded nowhere (eval of a checkpoint whose
    run was not tracked there)."""
    check_tracking(track)
    if track.to == "tensorboard":
        return Tracker()
    backend = {"wandb": WandbTracker, "mlflow": MlflowTracker}[track.to]
    entry = read_record(run_dir).get(track.to) if run_dir else None
    return backend(track, run_dir, name, config, job, entry)


def check_tracking(track: TrackConfig) -> None:
    """Refuses, before a command starts its work, settings that would do nothing, and a tracker not installed."""
    if track.to == "tensorboard":
        if track.project or track.group:
            raise ConfigError(
                "--track.project and --track.group name a W&B or MLflow run: add --track.to wandb or --track.to mlflow"
            )
        return
    require(track.to, track.to, f"--track.to {track.to}")


def track_training(cfg: TrainConfig, run_dir: Path) -> Tracker:
    """The tracker of the training run in `run_dir` (call on rank 0 only), holding every line of its metrics.jsonl."""
    tracker = open_tracker(cfg.track, run_dir, run_dir.name, to_dict(cfg), "train")
    metrics = run_dir / "metrics.jsonl"
    tracker.catch_up(parse_metrics(metrics)[0] if metrics.exists() else [])
    return tracker


def tracked_run_dir(folder: Path, track: TrackConfig) -> Path | None:
    """A checkpoint's folder, if its tracker.json records a run of `track`'s tracker (eval logs into that run)."""
    return folder if (folder / RECORD).is_file() and track.to in read_record(folder) else None


RECORD_FIELDS = {"wandb": ("id", "project"), "mlflow": ("run_id", "tracking_uri")}  # and "logged", each


def read_record(run_dir: Path) -> dict[str, dict[str, Any]]:
    """RUN_DIR/tracker.json, every field checked (empty if there is none)."""
    path = run_dir / RECORD
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}): delete it to log to new tracked runs") from e
    for kind, entry in raw.items() if isinstance(raw, dict) else [("its content", None)]:
        if not _is_entry(kind, entry):
            raise InputError(f"{path}: {kind} is not a tracked run's record: delete it to log to new tracked runs")
    return raw


def _is_entry(kind: str, entry: Any) -> bool:
    names = RECORD_FIELDS.get(kind)
    if names is None or not isinstance(entry, dict) or set(entry) != {*names, "logged"}:
        return False
    logged, texts = entry["logged"], [entry[name] for name in names]
    if type(logged) is not int or logged < 0 or not all(isinstance(t, str) and len(t) < 1000 for t in texts):
        return False
    return RUN_ID.fullmatch(texts[0]) is not None


class _Backend(Tracker):
    """A tracker with a run there: the record in RUN_DIR/tracker.json, and failures once open said once, not raised."""

    def __init__(
        self, track: TrackConfig, run_dir: Path | None, name: str, config: dict[str, Any], job: str, entry: Any
    ) -> None:
        self.run_dir, self.failed, self.closed = run_dir, False, False
        try:
            self.entry = self._open(track, name, config, job, entry)
        except MissingExtra:
            raise
        except Exception as e:
            raise RunFailed(f"--track.to {self.kind}: cannot open a run ({' '.join(str(e).split())[:300]})") from e
        self._write_record()

    def epoch(self, row: dict[str, Any]) -> None:
        numbers = {k: v for k, v in row.items() if type(v) in (int, float)}
        if self._try(self._log, numbers, row["epoch"]):
            self.entry["logged"] = row["epoch"]
            self._write_record()

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["epoch"] > self.entry["logged"]:
                self.epoch(row)

    def summary(self, figures: dict[str, float]) -> None:
        self._try(self._summary, figures)

    def files(self, *paths: Path) -> None:
        self._try(self._files, [p for p in paths if p.is_file()])

    def close(self, ending: Ending = "finished") -> None:
        if not self.closed:
            self.closed = True
            self._try(self._close, ending)

    def _try(self, call: Any, *args: Any) -> bool:
        """`call(*args)`, unless the tracker failed before; a failure is said once and the run goes on."""
        if self.failed:
            return False
        try:
            call(*args)
            return True
        except Exception as e:
            self.failed = True
            log.warning(
                "--track.to %s: logging failed (%s); the run goes on without it (metrics.jsonl holds every epoch, and "
                "a resume logs those the tracked run missed)", self.kind, " ".join(str(e).split())[:300],
            )  # fmt: skip
            return False

    def _write_record(self) -> None:
        if self.run_dir is not None:
            record = read_record(self.run_dir)
            record[self.kind] = self.entry
            write_atomic(self.run_dir / RECORD, json.dumps(record, indent=2) + "\n")

    # what each tracker does
    def _open(self, track: TrackConfig, name: str, config: dict[str, Any], job: str, entry: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _log(self, numbers: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _summary(self, figures: dict[str, float]) -> None:
        raise NotImplementedError

    def _files(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def _close(self, ending: Ending) -> None:
        raise NotImplementedError


class WandbTracker(_Backend):
    """Weights & Biases: a run per training run (resumed by its id), its config, a history step per epoch, the files
    in its Files tab; offline with WANDB_MODE=offline (then under RUN_DIR/wandb/, for `wandb sync`)."""

    kind = "wandb"

    def _open(self, track: TrackConfig, name: str, config: dict[str, Any], job: str, entry: Any) -> dict[str, Any]:
        wandb = require("wandb", "wandb", "--track.to wandb")
        project = track.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        where = os.environ.get("WANDB_DIR") or (str(self.run_dir) if self.run_dir else None)
        again = {"id": entry["id"], "resume": "allow"} if entry else {}
        self.run = wandb.init(
            project=entry["project"] if entry else project, name=name, group=track.group, job_type=job, config=config,
            dir=where, allow_val_change=True, **again,
        )  # fmt: skip
        return {"id": self.run.id, "project": self.run.project, "logged": entry["logged"] if entry else 0}

    def _log(self, numbers: dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def _summary(self, figures: dict[str, float]) -> None:
        self.run.summary.update(figures)

    def _files(self, paths: list[Path]) -> None:
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def _close(self, ending: Ending) -> None:
        self.run.finish(exit_code=1 if ending == "failed" else 0)


# MLflow's stores that need its full package (SQLAlchemy), not mlflow-skinny's client: its default is SQLite
DATABASE_STORES = ("sqlite:", "postgresql", "mysql", "mssql")


class MlflowTracker(_Backend):
    """MLflow, by its client (no global active run): a run per training run (continued by its id in the store of
    MLFLOW_TRACKING_URI), the config as params and config.json, a metric step per epoch, the files as artifacts."""

    kind = "mlflow"
    STATUS: ClassVar[dict[str, str]] = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def _open(self, track: TrackConfig, name: str, config: dict[str, Any], job: str, entry: Any) -> dict[str, Any]:
        mlflow = require("mlflow", "mlflow", "--track.to mlflow")
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()
        if uri.startswith(DATABASE_STORES):
            require(
                "sqlalchemy", "mlflow", f"MLflow's store {uri} (pip install mlflow, or MLFLOW_TRACKING_URI=http://...)"
            )
        self.client = client = MlflowClient(uri)
        experiment = track.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        if entry and entry["tracking_uri"] == uri and self._exists(entry["run_id"]):
            self.run_id, logged = entry["run_id"], entry["logged"]
            client.update_run(self.run_id, status="RUNNING")
        else:  # a new run (in another store than the recorded one: all of metrics.jsonl is logged to it)
            self.run_id, logged = self._create(experiment_id, track, name, job), 0
            flat = _flat(config)
            for start in range(0, len(flat), 100):  # MLflow takes at most 100 params a call
                client.log_batch(self.run_id, params=[_param(k, v) for k, v in list(flat.items())[start : start + 100]])
        client.log_dict(self.run_id, config, "config.json" if job == "train" else f"{job}-config.json")
        return {"run_id": self.run_id, "tracking_uri": uri, "logged": logged}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException as e:  # deleted there, or a store that never held it
            log.debug("MLflow run %s not found (%s): logging to a new one", run_id, e)
            return False

    def _create(self, experiment_id: str, track: TrackConfig, name: str, job: str) -> str:
        tags = {"dali_skd.job": job}
        if job == "compare" and track.group:
            return self._group_run(experiment_id, track.group)
        if track.group:
            tags["mlflow.parentRunId"] = self._group_run(experiment_id, track.group)
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def _group_run(self, experiment_id: str, group: str) -> str:
        """The run named for `group` that its runs are children of: found by its tag, else made."""
        runs = self.client.search_runs([experiment_id], "tags.`dali_skd.job` = 'compare'", max_results=1000)
        for run in runs:
            if run.data.tags.get("dali_skd.group") == group:
                return run.info.run_id
        tags = {"dali_skd.job": "compare", "dali_skd.group": group}
        run_id = self.client.create_run(experiment_id, run_name=group, tags=tags).info.run_id
        self.client.set_terminated(run_id, "FINISHED")  # it holds what its children do not: a comparison's table
        return run_id

    def _log(self, numbers: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in numbers.items()])

    def _summary(self, figures: dict[str, float]) -> None:
        self._log(figures, 0)

    def _files(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def _close(self, ending: Ending) -> None:
        self.client.set_terminated(self.run_id, self.STATUS[ending])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as MLflow params: dotted names (`optim.lr`)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])
