"""One checkpoint dict for everything (torchvision's reference recipe): the method's trained state (the classifier
under `model.`, then the method's heads; never a kd teacher, which `--teacher` names), optimizer, lr scheduler, grad
scaler, finished epochs, RNG state, the run's config, its classes and preprocessing, and the data stream its
batches were drawn from, so resuming is one code path. Written atomically (`files.open_atomic`); read with
`weights_only=True` (tensors and plain containers only), every field checked: a checkpoint may come from anyone.

`CheckpointSaver` is the one owner of a training run's checkpoint policy: what last.pt and best.pt hold, when each is
written, and where a resumed run starts (`resume_state` reads and checks last.pt first).

`TrainedRun` is a finished run as every command that applies one sees it: `TrainedRun.load(path)` gives its
classifier, method, config, classes and preprocessing, and an `EvalLoader` that cuts clips as it was trained. `path`
may also be a folder `cli.py export` wrote (`exported.py`): its classifier, without the method's heads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dali_skd.config import (
    ClipConfig,
    LoaderConfig,
    TrackConfig,
    TrainConfig,
    changed_settings,
    format_changes,
    from_dict,
    to_dict,
)
from dali_skd.data.augment import draw_layout
from dali_skd.data.loader import EvalLoader
from dali_skd.data.source import data_stream
from dali_skd.distributed import DistContext
from dali_skd.errors import ConfigError, DaliSkdError, InputError, MissingInput, OutputExists
from dali_skd.exported import EVALUATION_FIELDS, read_model_folder
from dali_skd.files import open_atomic
from dali_skd.format import PREPROCESSING_SETTINGS
from dali_skd.methods import Method, build_method
from dali_skd.models import ResNet3d, build_model
from dali_skd.runtime import Runtime
from dali_skd.step import TrainStep

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # 2: the trained state without a kd teacher, config parts (`clip`, `optim`, ...), data stream

# settings that may change when a run is resumed, as they leave the result as it was: where the shards and the run
# are (moved to another disk), the device, how the loader runs (all of `loader`), logging (`track` too) and the number
# of epochs; any other change is refused
RESUMABLE_CHANGES = {
    "out",
    "epochs",
    "resume",
    "log_every",
    "max_skipped_steps",
    "data",
    "train_shards",
    "eval_shards",
    "device",
    *(f"loader.{f.name}" for f in dataclasses.fields(LoaderConfig)),
    *(f"track.{f.name}" for f in dataclasses.fields(TrackConfig)),
}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Written atomically: a run killed while saving leaves the previous checkpoint intact."""
    with open_atomic(path) as f:
        torch.save({**state, "checkpoint_version": CHECKPOINT_VERSION}, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path`, checked (`checked_state`); `mmap`: its tensors mapped, read only when used."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"no checkpoint at {path}: pass the last.pt or best.pt of a `cli.py train` run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load's errors on a file that is not a checkpoint are of any type: named here
        raise InputError(
            f"{path} is not a readable dali-skd checkpoint ({load_failure(e)}): pass the last.pt or best.pt of a "
            "`cli.py train` run"
        ) from e
    return checked_state(state, path)


# what a pickle calls to run code as it is loaded: torch blocks some modules outright ("whose module os is blocked"),
# and refuses these with every other global
_RUNS_CODE = re.compile(
    r"((builtins|__builtin__)\.)?(eval|exec|compile|__import__|getattr|open|system)$"
    r"|(os|posix|nt|sys|subprocess|commands|runpy|pty|shutil|socket|importlib|builtins|__builtin__)\."
)


def refused_global(error: Exception) -> tuple[str, bool] | None:
    """What `torch.load(weights_only=True)` refused in a file, from its error: the pickled global's name, and whether
    it is a call that runs code (`posix.system`, `eval`); None for any other error."""
    match = re.search(r"GLOBAL (\S+)( whose module \S+ is blocked)?", str(error))
    if match is None:
        return None
    return match[1], bool(match[2] or _RUNS_CODE.match(match[1]))


def load_failure(error: Exception) -> str:
    """Why `torch.load(weights_only=True)` failed, in one line (torch's own text runs to eight, with advice to load
    the file without `weights_only` even when the file would run a shell command)."""
    refused = refused_global(error)
    if refused is None:
        lines = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()  # the reason, past the advice
        return lines[0][:200] if lines else type(error).__name__
    name, runs_code = refused
    if runs_code:
        return f"it holds a pickled call of {name}, code that would run as the file is loaded: never load it"
    return f"it holds a pickled object of class {name}, which a weights-only load refuses"


def checked_state(state: object, path: str | Path) -> dict[str, Any]:
    """`state` itself, if it is a checkpoint of the version this code reads, holding a run's config, classes,
    preprocessing settings and weights."""
    if not isinstance(state, dict) or "checkpoint_version" not in state:
        raise InputError(f"{path} is not a dali-skd checkpoint: pass the last.pt or best.pt of a `cli.py train` run")
    if state["checkpoint_version"] != CHECKPOINT_VERSION:
        raise InputError(
            f"{path} is a dali-skd checkpoint of version {state['checkpoint_version']!r}, and this code reads version "
            f"{CHECKPOINT_VERSION}: train it again, or use the dali-skd that wrote it"
        )
    classes, preprocessing, weights = state.get("classes"), state.get("preprocessing"), state.get("method")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{path}: its classes are not a list of class names: pass a checkpoint of a run")
    if not isinstance(preprocessing, dict):
        raise InputError(f"{path}: it does not record how its training videos were preprocessed: pass one of a run")
    # A checkpoint trained before the manifest recorded optimize_huffman: its strips had the standard tables.
    state["preprocessing"] = preprocessing = {"optimize_huffman": False, **preprocessing}
    if sorted(preprocessing) != sorted(PREPROCESSING_SETTINGS):
        raise InputError(
            f"{path}: its preprocessing settings are not {', '.join(PREPROCESSING_SETTINGS)}: pass one of a run"
        )
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise InputError(f"{path}: its weights are not a state dict of tensors: pass a checkpoint of a run")
    if not isinstance(state.get("config"), dict):
        raise InputError(f"{path}: it holds no run config: pass a checkpoint of a run")
    run_config(state, path)
    return state


def run_config(state: dict[str, Any], path: str | Path) -> TrainConfig:
    return from_dict(TrainConfig, state["config"], f"{path} config")


def classifier_state(state: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The classifier's (encoder + `fc`) state dict in a checkpoint: the "model." entries of the method's."""
    weights = {k.removeprefix("model."): v for k, v in state["method"].items() if k.startswith("model.")}
    if not weights:
        raise InputError(f"{path} holds no model weights: pass a checkpoint of a run")
    return weights


def nonfinite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    floating = {name: t for name, t in weights.items() if t.is_floating_point()}
    if not floating:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in floating.values()]).tolist()  # one sync for all
    return [name for name, ok in zip(floating, finite, strict=True) if not ok]


def check_finite(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuses a checkpoint whose weights are not all finite: the run that wrote it diverged."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise InputError(
            f"{path} holds non-finite weights ({len(bad)} of {len(weights)} tensors, e.g. {bad[0]}): the run that "
            "wrote it diverged; use an earlier checkpoint, or train again with a lower --optim.lr"
        )


def trained_clip(path: str | Path) -> dict[str, Any]:
    """How the clips were cut for the run that wrote a checkpoint or an exported folder (its config's `clip` part),
    read without loading its weights: the defaults of eval's, predict's and features' `--clip.*` flags. Empty for a
    path that holds no readable checkpoint (said at the debug level): loading it properly then says why."""
    try:
        if Path(path).is_dir():
            return asdict(read_model_folder(path, with_weights=False).config.clip)
        return asdict(run_config(load_checkpoint(path, mmap=True), path).clip)
    except DaliSkdError as e:
        log.debug("%s: no clip settings read from it (%s)", path, e)
        return {}


def validation_figures(state: dict[str, Any], path: str | Path) -> dict[str, float]:
    """A checkpoint's validation figures: its epoch's (`EVALUATION_FIELDS`, the metrics line's names), the
    best so far, and the clips per video they were measured with; each checked to be a finite number."""
    metrics = state.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: its metrics are not a record of an epoch: pass a checkpoint of a run")
    figures = {k: metrics[k] for k in EVALUATION_FIELDS if k in metrics}
    figures.update({k: state[k] for k in ("epoch", "best_epoch") if k in state})
    if "val_top1" in figures:
        figures["val_clips"] = run_config(state, path).val_clips
    for key, value in figures.items():
        if type(value) not in (int, float) or not math.isfinite(value):
            raise InputError(f"{path}: its {key} is {value!r:.40}, not a finite number")
    return figures


def resume_state(cfg: TrainConfig, ctx: DistContext) -> dict[str, Any] | None:
    """The last.pt in `cfg.out` a run resumes from (`cfg.resume`), checked: its weights finite, drawn from the data
    stream this code draws, trained with the settings of `cfg` (but `RESUMABLE_CHANGES`) for no more epochs than
    `cfg.epochs`. None for a run that starts afresh; refused where one is there and `cfg.resume` is not given."""
    path = Path(cfg.out) / "last.pt"
    if not cfg.resume:
        if path.exists():
            raise OutputExists(f"{cfg.out} already holds a run: add --resume to continue it, or pass a new --out")
        return None
    if not path.exists():
        if cfg.resume != "auto":
            raise MissingInput(
                f"--resume: {path} does not exist, so there is no run to continue: check --out, drop --resume "
                "to start one there, or pass --resume auto (continue if there is one, else start)"
            )
        if ctx.is_main:
            log.info("--resume auto: no %s yet, starting a new run", path)
        return None
    state = load_checkpoint(path)
    check_finite(state["method"], path)
    if state.get("data_stream") != data_stream():
        draws = state.get("draws")
        if not (isinstance(draws, list) and draws and all(isinstance(d, str) for d in draws)):
            draws = ["(not recorded)"]
        raise ConfigError(
            f"{path} was trained on data stream {state.get('data_stream')!r:.40} (draws per view: "
            f"{', '.join(draws):.300}), and this code draws "
            f"stream {data_stream()!r} ({', '.join(draw_layout())}): resuming would go on with other clips and "
            "augmentations than the run's; pass a new --out (or resume with the code that wrote it)"
        )
    changes = changed_settings(to_dict(run_config(state, path)), to_dict(cfg))
    refused = {name: values for name, values in changes.items() if name not in RESUMABLE_CHANGES}
    if refused:
        raise ConfigError(
            f"{path} was trained with other settings ({format_changes(refused)}): resume with the run's "
            "settings (only where the data and the run are, how the loader runs, --log-every and --epochs may "
            "change), or pass a new --out"
        )
    if state["epoch"] > cfg.epochs:
        raise ConfigError(
            f"{path} has trained {state['epoch']} epochs, more than --epochs {cfg.epochs}: resume with "
            f"--epochs {state['epoch']} or more, or pass a new --out"
        )
    return state


class CheckpointSaver:
    """The one owner of a training run's checkpoint policy (as timm's `CheckpointSaver` is): what a checkpoint holds
    (the parts of the run: its step's method, optimizer and scaler, its lr schedule, config, classes and
    preprocessing), when one is written (`save_epoch`: last.pt after every epoch, best.pt first when that epoch's
    validation is the best so far; `save_stopped`: last.pt when a signal stops an epoch, with its step and running
    sums, a recovery point), which validation is the best (`validated`), and where a resumed run starts
    (`restore`). Rank 0 writes; every rank keeps the same account."""

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        step: TrainStep,
        scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
        classes: list[str],
        preprocessing: dict[str, Any],
    ) -> None:
        self.cfg, self.ctx, self.step, self.scheduler = cfg, ctx, step, scheduler
        self.classes, self.preprocessing = classes, preprocessing
        self.last, self.best = Path(cfg.out) / "last.pt", Path(cfg.out) / "best.pt"
        self.best_top1, self.best_epoch = -1.0, 0
        self.start_epoch, self.start_step = 0, 0  # where the run starts: a resumed one, where last.pt stopped
        self.start_sums: dict[str, Any] | None = None  # the running sums of the steps before `start_step`

    def restore(self, state: dict[str, Any], steps_per_epoch: int) -> None:
        """The run where `state` (last.pt, `resume_state`) left it: weights, optimizer, schedule, scaler, RNG, the
        best so far, and the epoch and step it goes on from. A mid-epoch checkpoint goes on only where the epoch's
        batches are those it was cut from: as many processes, as many steps an epoch."""
        self.step.method.load_trained_state(state["method"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best_top1, self.best_epoch = state["epoch"], state["best_top1"], state["best_epoch"]
        self.start_step, self.start_sums = state.get("step", 0), state.get("sums")
        torch.set_rng_state(state["rng"]["torch"])
        if self.ctx.device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if not self.start_step:
            return
        where = f"{self.last} stopped at step {self.start_step} of epoch {self.start_epoch + 1}"
        if state["world"] != self.ctx.world:
            raise ConfigError(
                f"{where} with {state['world']} process(es), and this run has {self.ctx.world}: resume it with "
                f"{state['world']} (each process reads its own part of the epoch)"
            )
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ConfigError(
                f"{where} of {state['steps_per_epoch']} steps, and the data now gives {steps_per_epoch} steps an "
                "epoch: resume it on the dataset it was trained on"
            )

    def validated(self, epoch: int, top1: float, finite: bool) -> bool:
        """Whether epoch `epoch` (from 0), validated at `top1`, is the best so far (a model whose outputs were not
        all `finite` never is: a NaN model "predicts" class 0); if so, it is kept as the best."""
        if top1 > self.best_top1 and finite:
            self.best_top1, self.best_epoch = top1, epoch + 1
            return True
        return False

    def save_epoch(self, epoch: int, record: dict[str, Any], bad_samples: list[str]) -> None:
        """After epoch `epoch` (from 0), its metrics line `record`: best.pt if it was the best, then last.pt, where
        a resume starts, so that a disk full between the two leaves a pair a resume makes whole (it redoes the
        epoch)."""
        self._save(epoch + 1, bad_samples, record=record, best=self.best_epoch == epoch + 1)

    def save_stopped(
        self, epoch: int, step: int, sums: dict[str, Any], steps_per_epoch: int, bad_samples: list[str]
    ) -> None:
        """last.pt of epoch `epoch` (from 0) stopped after `step` of its `steps_per_epoch` steps, and their `sums`."""
        where = {"step": step, "sums": sums, "steps_per_epoch": steps_per_epoch, "world": self.ctx.world}
        self._save(epoch, bad_samples, where=where)

    def _save(
        self,
        epochs: int,
        bad_samples: list[str],
        record: dict[str, Any] | None = None,
        where: dict[str, Any] | None = None,
        best: bool = False,
    ) -> None:
        if not self.ctx.is_main:
            return
        state = {
            "method": self.step.method.trained_state(),  # the classifier is its "model." entries; no kd teacher
            "optimizer": self.step.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "epoch": epochs,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "config": to_dict(self.cfg),
            "classes": self.classes,
            "preprocessing": self.preprocessing,
            "metrics": record or {},
            "bad_samples": bad_samples,  # undecodable videos: a resumed run skips them from the start
            "data_stream": data_stream(),  # the order of the random draws its batches came from
            "draws": list(draw_layout()),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.ctx.device.type == "cuda" else [],
            },
            **(where or {}),
        }
        if best:
            save_checkpoint(self.best, state)
        save_checkpoint(self.last, state)


@dataclass
class TrainedRun:
    """A finished (or stopped) training run, from one of its checkpoints: its classifier on `device`, checked for
    non-finite weights, its config, classes and preprocessing settings (what `predict` transcodes new videos
    with); its method, heads and all, when asked for."""

    path: Path
    config: TrainConfig
    classes: list[str]
    preprocessing: dict[str, Any]
    classifier: ResNet3d
    device: torch.device
    weights: dict[str, torch.Tensor] = field(repr=False)  # the method's trained state (an exported folder's: fc's)
    figures: dict[str, float] = field(default_factory=dict)  # its validation figures (`validation_figures`)
    exported: bool = False  # from a folder `cli.py export` wrote: the classifier only

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", num_classes: int | None = None) -> TrainedRun:
        """The run of the checkpoint (or exported folder) at `path`; with `num_classes`, it must predict that many
        classes (a dataset's)."""
        if exported := Path(path).is_dir():
            folder = read_model_folder(path)
            config, classes, preprocessing, figures = (
                folder.config,
                folder.classes,
                folder.preprocessing,
                folder.evaluation,
            )
            weights = {f"model.{k}": v for k, v in folder.weights.items()}
        else:
            state = load_checkpoint(path, device)
            config, classes, preprocessing = run_config(state, path), state["classes"], state["preprocessing"]
            weights, figures = state["method"], validation_figures(state, path)
        check_finite(weights, path)
        unchanged = "the folder `cli.py export` wrote" if exported else "the best.pt or last.pt of a run"
        try:
            classifier = build_model(config.arch, len(classes), shortcut=config.shortcut)
            classifier.load_state_dict(classifier_state({"method": weights}, path))
        except (ValueError, RuntimeError) as e:  # a model it does not name, weights of another shape
            said = " ".join(str(e).split()).rstrip(".")  # load_state_dict's list of problems, in one line
            raise InputError(f"{path}: {said}; pass {unchanged}, unchanged") from e
        device = torch.device(device)
        run = cls(Path(path), config, classes, preprocessing, classifier.to(device), device, weights, figures, exported)
        if num_classes is not None:
            run.check_classes(num_classes)
        return run

    def check_classes(self, num_classes: int) -> None:
        """Refuses a dataset of another class count than the run was trained on."""
        if len(self.classes) != num_classes:
            raise InputError(
                f"{self.path} was trained on {len(self.classes)} classes, this dataset has {num_classes}: "
                "use a checkpoint trained on the same dataset"
            )

    @cached_property
    def method(self) -> Method:
        """The trained method around the classifier (a kd run's with its teacher, loaded from its `--teacher`)."""
        if self.exported:
            raise InputError(
                f"{self.path} is an exported model, its classifier only: the method's heads ({self.config.method}) are "
                "in the checkpoint it was exported from; pass that"
            )
        teacher = None
        if self.config.teacher:
            teacher = TrainedRun.load(self.config.teacher, self.device, len(self.classes)).classifier
        method = build_method(self.config.method, self.classifier, len(self.classes), self.config.objective, teacher)
        method.load_trained_state(self.weights)
        return method.to(self.device)

    def eval_loader(
        self,
        data: str,
        split: str | None = None,
        *,
        clip: ClipConfig | None = None,
        runtime: Runtime | None = None,
        **options: Any,
    ) -> EvalLoader:
        """An `EvalLoader` of `data`'s `split` (default: its held-out one), cutting the clips as the run was trained
        (`clip`: otherwise), on this run's device in fp32 (`runtime`: otherwise). `options` go to the loader:
        batch_size, clips_per_video, spatial_crops, loader, shards."""
        runtime = runtime or Runtime(self.device)
        return EvalLoader(data, split, clip=clip or self.config.clip, runtime=runtime, **options)
