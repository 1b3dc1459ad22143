"""The typed configuration: the parts several commands share (how clips are cut, how the loader runs, ...), the
training run's settings, which are also the schema of a saved run (`config.json` in the run directory), and the
preprocessing's. A command's own config (`dali_skd/commands/`) nests the parts it reads; every field is a flag:
`--name` at the top, `--part.name` in a part (`cli_options`). Defaults are the paper's."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from dali_skd.data.augment import AUGMENTATIONS, Augmentation
from dali_skd.errors import ConfigError
from dali_skd.files import write_atomic

Device = Literal["auto", "cuda", "cpu"]  # auto: the GPU when CUDA is available, else the CPU
Amp = Literal["auto", "fp16", "bf16", "off"]  # auto: fp16 on CUDA, off (fp32) on the CPU
# the pixel values the network sees (`data.source.INPUT_NORMS`): the paper's [-1, 1], or those of Hara et al.'s
# Kinetics models (3D-ResNets-PyTorch), whose 2020 and 2018 releases were trained on different ones
InputNorm = Literal["paper", "kinetics", "kinetics-2018"]


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A config field with its CLI help text (`meta`: more for `cli_options`, e.g. `choices`; for a number, or each
    number of a range, its limits `at_least`, `more_than`, `at_most`, checked wherever a config is read)."""
    if isinstance(default, list | dict | tuple) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PreprocessConfig:
    dataset: Literal["ucf101", "hmdb51", "kinetics400", "folder", "synthetic"] = setting(
        "synthetic", "dataset adapter (its official file names and split files)"
    )
    out: str = setting("data/synthetic", "output directory (its layout: docs/format.md, 'The output folder')")
    root: str | None = setting(
        None, "dataset root holding the videos (synthetic: where to write them; default OUT/videos)"
    )
    splits_dir: str | None = setting(None, "folder with the official split files (default: look under ROOT)")
    split: int = setting(1, "official split number (UCF101, HMDB51: 1, 2 or 3)")
    format: Literal["jpeg", "vp9"] = setting(
        "jpeg", "jpeg: strips of JPEG frames (fast to decode); vp9: webm, 2.5-4.5x smaller, 7x the CPU to decode"
    )
    short_side: int = setting(128, "scale the shorter side of every frame to this many pixels")
    fps: float | None = setting(None, "resample to this constant frame rate (default: the source's)")
    quality: int | None = setting(
        None, "jpeg: JPEG quality 1-100 (default 50; 90 before 2026-12); vp9: CRF 0-63 (default 32)"
    )
    frames_per_jpeg: int = setting(8, "jpeg: consecutive frames stacked into one JPEG strip")
    optimize_huffman: bool = setting(
        True, "jpeg: Huffman tables fitted to each strip (2-4% fewer bytes, the same pixels), else libjpeg's standard"
    )
    shard_size_mb: float = setting(256.0, "start a new shard once one reaches this size")
    workers: int = setting(os.cpu_count() or 1, "videos transcoded at once")
    part: str | None = setting(None, "I/N: do the I-th of N deterministic parts (I from 1), e.g. one array job")
    limit: int | None = setting(
        None,
        "only the first N videos of each split's shuffled order (of the part, with --part): a sample of every class "
        "whose cost the summary projects onto the whole split",
        at_least=1,
    )
    resume: bool = setting(False, "continue an interrupted run in OUT; finished shards are kept")
    val_fraction: float = setting(0.1, "folder: fraction of each class held out as the test split")
    difficulty: Literal["normal", "hard"] = setting(
        "normal", "synthetic: normal, or hard (subtler motions, clutter, few videos in groups; for comparing methods)"
    )
    classes: int | None = setting(None, "synthetic: number of classes (default: normal 8, hard 12)")
    videos_per_class: int | None = setting(
        None, "synthetic: videos per class, train and test together (default: normal 60, hard 24)"
    )
    seed: int = setting(0, "seed for the synthetic videos and the order of samples in the shards")
    ffmpeg: str | None = setting(None, "ffmpeg binary (default: `ffmpeg` on PATH, else the one imageio-ffmpeg ships)")


def augment_config(table: Mapping[str, Augmentation] = AUGMENTATIONS) -> type:
    """The augmentations' settings, one field per probability and per parameter range of `table`: its flags
    `--augment.p-NAME` and `--augment.NAME LO HI` follow from the table (`data/augment.py`)."""
    fields: list[tuple[str, type, Any]] = []
    for a in table.values():
        fields.append((f"p_{a.name}", float, setting(a.p, f"probability of {a.what}", at_least=0, at_most=1)))
        if a.range is not None:
            fields.append((a.name, tuple[float, float], setting(a.range, a.range_help, **a.limits)))
    doc = "The paper's augmentations (`data/augment.py`), each applied with its probability, one draw per clip."
    return dataclasses.make_dataclass("AugmentConfig", fields, namespace={"__doc__": doc, "__module__": __name__})


AugmentConfig = augment_config()


# Settings several commands take, declared once.
def data_field() -> Any:
    return setting(
        "data/synthetic",
        "dataset directory holding manifest.json, or an http(s):// URL prefix, or a pipe: command with {} for the "
        "file name (e.g. 'pipe:aws s3 cp s3://bucket/ucf101/{} -')",
    )


def device_field() -> Any:
    return setting("auto", "auto: the GPU when CUDA is available, else the CPU")


def amp_field() -> Any:
    return setting("auto", "mixed precision (auto: fp16 on CUDA, off on CPU)")


def channels_last_field() -> Any:
    return setting(True, "channels_last_3d memory layout on CUDA")


def val_fraction_field(default: float) -> Any:
    return setting(
        default,
        "validate (pick best.pt, drive the lr schedule) on this fraction of each class of the training split, set "
        "apart by a hash of the video key and not trained on; 0: on the test split, the paper's protocol",
        at_least=0,
        at_most=0.5,
    )


def clips_per_video_field() -> Any:
    return setting(10, "clips per video, uniformly spaced", at_least=1)


@dataclass
class ClipConfig:
    """How a clip is cut from a video, and the pixel values the network sees: what a model learns on. `eval`,
    `predict` and `features` take a checkpoint's unless told otherwise."""

    length: int = setting(16, "frames per clip", at_least=1)
    frame_stride: int = setting(
        1, "take every S-th frame: a clip spans (length - 1) x S + 1 frames of the video", at_least=1
    )
    crop: int = setting(112, "side of the square window cropped from every frame of a clip", at_least=1)
    norm: InputNorm = setting(
        "paper",
        "pixel values the network sees: paper: [-1, 1]; kinetics: (x / 255 - mean) / std with the Kinetics mean "
        "and std of Hara et al.'s 2020 models; kinetics-2018: x - mean (0-255 pixels, ActivityNet mean), for their "
        "2018 models",
    )


@dataclass
class LoaderConfig:
    """How the loader runs: none of it changes a clip, so a resumed run may change any of it."""

    threads: int = setting(
        0,
        "DALI CPU threads (0: one per core, at most 16): the CPU operators' pool and, on a GPU, each JPEG decoder's "
        "own pool (0 with --loader.concurrency full: the cores shared among the decoders)",
        at_least=0,
    )
    concurrency: Literal["backend", "full"] = setting(
        "backend",
        "DALI's operator concurrency: backend (DALI's default: operators of one kind take turns, so the GPU's JPEG "
        "decoders decode one at a time) or full (they run side by side; DALI then needs DALI_EXEC2_NUM_THREADS set "
        "before the process's first pipeline, which the loader does when it is not set)",
    )
    prefetch: int = setting(2, "batches DALI prepares ahead", at_least=1)
    hw_decoder_load: float = setting(
        0.65,
        "GPU: share of the JPEG strips given to the hardware JPEG decoder (A100/H100/H200), the rest to CUDA",
        at_least=0,
        at_most=1,
    )
    preallocate_width_hint: int = setting(
        -1,
        "GPU: widest strip the JPEG decoders preallocate for (-1: from the shards; 0: no preallocation)",
        at_least=-1,
    )
    preallocate_height_hint: int = setting(
        -1,
        "GPU: tallest strip the JPEG decoders preallocate for (-1: from the shards; 0: no preallocation)",
        at_least=-1,
    )
    read_timeout: float = setting(
        60.0,
        "http(s) and pipe: data: seconds without a byte before a read is cut and retried (3 tries, resuming where "
        "it was cut); a shard that still fails is skipped",
        more_than=0,
    )
    stall_timeout: float = setting(
        300.0,
        "stop the run when no batch comes for this many seconds (keep it over 3x --loader.read-timeout)",
        more_than=0,
    )
    max_bad_samples: int = setting(
        100,
        "stop once more samples than this were skipped as damaged or unreadable (each is named in the log)",
        at_least=0,
    )


@dataclass
class SamplingConfig:
    """How training draws its samples."""

    shuffle_buffer: int = setting(256, "samples held for shuffling (the shards are already shuffled)", at_least=1)
    same_clip: bool = setting(False, "make both views from one clip (default: two independently trimmed clips)")


@dataclass
class OptimConfig:
    """SGD and the plateau schedule."""

    lr: float = setting(0.01, "SGD learning rate", more_than=0)
    momentum: float = setting(0.9, "SGD momentum", at_least=0, at_most=1)
    weight_decay: float = setting(5e-4, "SGD weight decay", at_least=0)
    lr_patience: int = setting(10, "epochs without validation improvement before the lr is divided", at_least=0)
    lr_factor: float = setting(0.1, "factor applied to the lr on a plateau", more_than=0, at_most=1)
    lr_backbone: float = setting(
        1.0, "the encoder learns at this times --optim.lr; fc and the method's heads at --optim.lr", at_least=0
    )


@dataclass
class ObjectiveConfig:
    tau: float = setting(10.0, "softmax temperature of the self-distillation target (Eq. 2)", more_than=0)
    alpha: float = setting(0.1, "weight of the KL term (Eq. 5)", at_least=0)
    beta: float = setting(1.0, "weight of the Siamese term (Eq. 5)", at_least=0)
    kl_detach_target: bool = setting(
        False,
        "stop the gradient through the soft target softmax((p1+p2)/tau) (the paper does not say; default: it flows)",
    )
    kl_tau_squared: bool = setting(False, "scale the KL term by tau^2 as Hinton et al. do (paper: no)")
    proj_dim: int = setting(2048, "projector g output width", at_least=1)
    pred_hidden: int = setting(512, "predictor q hidden width", at_least=1)
    kd_tau: float = setting(4.0, "kd baseline: temperature of teacher and student softmax (Hinton et al.)", more_than=0)
    kd_alpha: float = setting(
        0.9, "kd baseline: loss = (1 - alpha) CE + alpha tau^2 KL(teacher || student)", at_least=0, at_most=1
    )


@dataclass
class TrackConfig:
    """Where a run is logged besides its folder (metrics.jsonl, tb/ for TensorBoard, curves.png): Weights & Biases or
    MLflow, from rank 0 (`tracking.py`). Their own variables set the rest: WANDB_ENTITY, WANDB_MODE=offline,
    MLFLOW_TRACKING_URI."""

    to: Literal["tensorboard", "wandb", "mlflow"] = setting(
        "tensorboard",
        "tensorboard: the run folder's tb/ only (always written); wandb or mlflow: to Weights & Biases or MLflow too "
        "(the extra of that name)",
    )
    project: str | None = setting(
        None, "W&B project or MLflow experiment (default: WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME, else dali-skd)"
    )
    group: str | None = setting(
        None, "group the run under this name: a W&B group, an MLflow parent run (compare: its folder's name)"
    )


@dataclass
class ScoreSettings:
    """What a command that scores videos with a trained run takes (`eval`, `predict`, `features`): the checkpoint,
    the clips and crops of a video, the batch, the precision and the device; the `clip` part, which defaults to the
    checkpoint's (`cli.py` layers it: defaults, the checkpoint's, --config, the flags given), and the loader's."""

    checkpoint: str = setting(
        "runs/run/best.pt", "checkpoint of a run (its best.pt or last.pt), or a folder `cli.py export` wrote"
    )
    batch_size: int = setting(32, "clips per batch", at_least=1)
    clips_per_video: int = clips_per_video_field()
    spatial_crops: int = setting(
        1, "windows per clip: 1 (the centre) or 3 (both ends and the centre of the long side, the Kinetics protocol)"
    )
    amp: Amp = amp_field()
    device: Device = device_field()
    clip: ClipConfig = setting(ClipConfig(), "clips (default: as the checkpoint was trained)")
    loader: LoaderConfig = setting(LoaderConfig(), "data loading")


def method_names() -> list[str]:
    """The methods of Table II, from their one registry."""
    from dali_skd.methods import METHODS  # torch: imported only when the names are asked for, not to parse flags

    return list(METHODS)


@dataclass
class TrainSettings:
    """A training run's settings but its method and seed: what every run of `compare` shares."""

    arch: str = setting("r3d18", "encoder: r3d10, r3d18, r3d34, r3d50, r3d101, or a -tiny variant")
    data: str = data_field()
    train_shards: str | None = setting(None, "training shards instead of the manifest's: brace patterns or URLs")
    eval_shards: str | None = setting(None, "held-out shards instead of the manifest's: brace patterns or URLs")
    out: str = setting("runs/run", "run directory: config, metrics, checkpoints, curves")
    epochs: int = setting(200, "training epochs", at_least=1)
    batch_size: int = setting(32, "samples per GPU (or per process on the CPU)", at_least=1)
    val_clips: int = setting(1, "clips per video for the per-epoch validation", at_least=1)
    val_fraction: float = val_fraction_field(0.0)
    shortcut: Literal["A", "B"] | None = setting(
        None,
        "encoder shortcut: A (zero-padded identity) or B (1x1x1 conv + BN); default: A for r3d10/18/34, B for 50/101",
    )
    init: str | None = setting(
        None,
        "start from these weights, not a resume (optimizer, epoch and schedule start fresh): a dali-skd checkpoint or "
        "exported folder, or a Kinetics model of Hara et al. (e.g. r3d18_K_200ep.pth); a classifier of another size is "
        "re-initialised",
    )
    freeze: Literal["none", "stem", "layer1", "layer2", "layer3", "layer4", "encoder"] = setting(
        "none",
        "fix the encoder up to and including this stage (stem: conv1 + bn1; encoder: all of it, a linear probe): "
        "no gradients, BatchNorm statistics kept",
    )
    teacher: str | None = setting(
        None, "kd: checkpoint (or exported folder) of the frozen teacher (e.g. a trained r3d50)"
    )
    amp: Amp = amp_field()
    channels_last: bool = channels_last_field()
    device: Device = device_field()
    log_every: int = setting(
        20,
        "steps between TensorBoard scalars and checks of the loss (and, under torchrun, of a stop signal)",
        at_least=1,
    )
    max_skipped_steps: int = setting(
        100,
        "fp16: stop when the grad scaler skips this many steps in a row (their gradients overflow at any scale)",
        at_least=0,
    )
    optim: OptimConfig = setting(OptimConfig(), "the optimizer")
    track: TrackConfig = setting(TrackConfig(), "experiment tracking")
    clip: ClipConfig = setting(ClipConfig(), "clips")
    sampling: SamplingConfig = setting(SamplingConfig(), "training samples")
    augment: AugmentConfig = setting(AugmentConfig(), "augmentations")
    objective: ObjectiveConfig = setting(ObjectiveConfig(), "loss terms")
    loader: LoaderConfig = setting(LoaderConfig(), "data loading")


@dataclass
class TrainConfig(TrainSettings):
    """`cli.py train`: one run. Also the schema of a saved run (its config.json, a checkpoint's "config")."""

    method: str = setting(
        "skd-srl", "training objective: the paper's method or one of its baselines", choices=method_names
    )
    seed: int = setting(0, "seed for weights, data order and augmentation draws", at_least=0)
    resume: bool | Literal["auto"] = setting(
        False, "continue from OUT/last.pt (it must exist); --resume auto: continue if OUT holds one, else start"
    )

    @classmethod
    def of(cls, settings: TrainSettings, **run: Any) -> TrainConfig:
        """A run of `settings` (any `TrainSettings`, e.g. a comparison's): `run` sets its method, seed, ... and
        replaces any of the settings."""
        shared = {f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainSettings)}
        return cls(**{**shared, **run})


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "config", flags: bool = False) -> T:
    """Build `cls` from a (possibly partial) nested dict (a saved config, a checkpoint's: input from anyone); an
    unknown key, or a value not of its setting's type or outside its limits, is an error that names it: by its
    dotted path under `where`, or (`flags`: the command line's settings) as the flag that sets it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is {raw!r:.60}, not a group of settings")
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(fields)})")
        sub = _nested_type(cls, key)
        path = f"{where}.{key}" if where else key
        if sub:
            kwargs[key] = from_dict(sub, value, path, flags)
        else:
            name = "--" + path.replace("_", "-") if flags else path
            kwargs[key] = _in_limits(fields[key], _checked(hints[key], value, name), name)
    return cls(**kwargs)


def _in_limits(f: dataclasses.Field, value: Any, name: str) -> Any:
    """`value`, if it is no number, or a finite one within its setting's limits (`setting`'s `at_least`, `more_than`,
    `at_most`); a range (LO, HI) also needs LO not above HI. Else a ValueError that names the setting."""
    numbers = [x for x in (value if isinstance(value, tuple) else (value,)) if type(x) in (int, float)]
    limits = [
        (f.metadata.get("at_least"), lambda x, v: x >= v, "at least"),
        (f.metadata.get("more_than"), lambda x, v: x > v, "more than"),
        (f.metadata.get("at_most"), lambda x, v: x <= v, "at most"),
    ]
    shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
    for x in numbers:
        if not math.isfinite(x):
            raise ConfigError(f"{name} is {shown}; it must be a finite number")
        for limit, within, words in limits:
            if limit is not None and not within(x, limit):
                each = "each of its numbers" if isinstance(value, tuple) else "it"
                raise ConfigError(f"{name} is {shown}; {each} must be {words} {limit}")
    if isinstance(value, tuple) and len(numbers) == 2 and numbers[0] > numbers[1]:
        raise ConfigError(f"{name} is {shown}; a range is LO HI, with LO not above HI")
    return value


def _checked(kind: Any, value: Any, where: str) -> Any:
    """`value` if it is what annotation `kind` allows (a list read from JSON becomes a tuple), else a ValueError."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _checked(option, value, where)
            except ValueError:
                continue
    elif typing.get_origin(kind) is Literal:
        if value in typing.get_args(kind) and type(value) in {type(a) for a in typing.get_args(kind)}:
            return value
    elif typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if isinstance(value, list | tuple) and len(value) == len(items):
            return tuple(_checked(item, v, where) for item, v in zip(items, value, strict=True))
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):  # int, str, bool, None
        return value
    raise ConfigError(f"{where} is {value!r:.60}, not {_kind(kind)}")


def _kind(kind: Any) -> str:
    """An annotation in words: `an integer`, `one of 'paper', 'kinetics'`, `a pair of numbers or None`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(map(repr, args))
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(args)} numbers"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "None"}[kind]


def _nested_type(cls: type, name: str) -> type | None:
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = default.default_factory() if default.default_factory is not dataclasses.MISSING else None
    return type(value) if dataclasses.is_dataclass(value) else None


def save_json(cfg: Any, path: str | Path) -> None:
    write_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def read_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings a JSON file holds, as it holds them (a whole saved config or some of it), checked against `cls`."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a JSON object of settings, not {type(raw).__name__}")
    from_dict(cls, raw, str(path))
    return raw


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_settings(cls, path), str(path))


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


ABSENT: Any = _Absent()  # the value of a setting one of two compared settings dicts does not hold


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two nested dicts (a saved config and the current one), by dotted name
    (`lr`, `loader.crop`), sorted, each with its saved and its current value; a setting only one holds differs."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(saved.keys() | current.keys()):
        then, now = saved.get(key, ABSENT), current.get(key, ABSENT)
        if isinstance(then, Mapping) and isinstance(now, Mapping):
            changes.update({f"{key}.{name}": values for name, values in changed_settings(then, now).items()})
        elif then != now:
            changes[key] = (then, now)
    return changes


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`lr: 0.01 then, 0.5 now; loader.crop: 112 then, 64 now`."""
    return "; ".join(f"{name}: {then!r} then, {now!r} now" for name, (then, now) in changes.items())
