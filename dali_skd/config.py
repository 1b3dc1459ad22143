"""The typed configuration: the parts several commands share (how clips are cut, how the loader runs, ...), the
training run's settings, which are also the schema of a saved run (`config.json` in the run directory), and the
preprocessing's. A command's own config (`dali_skd/commands/`) nests the parts it reads; every field is a flag:
`--name` at the top, `--part.name` in a part (`cli_options`). Defaults are the paper's. Each config is declared and
checked as `settings.py` says; the augmentations' settings live with their table (`data/augment.py`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from dali_skd.data.augment import AugmentConfig
from dali_skd.files import write_atomic
from dali_skd.settings import ConfigError, from_dict, setting, settings

T = TypeVar("T")

Device = Literal["auto", "cuda", "cpu"]  # auto: the GPU when CUDA is available, else the CPU
Amp = Literal["auto", "fp16", "bf16", "off"]  # auto: fp16 on CUDA, off (fp32) on the CPU
# the pixel values the network sees (`data.source.INPUT_NORMS`): the paper's [-1, 1], or those of Hara et al.'s
# Kinetics models (3D-ResNets-PyTorch), whose 2020 and 2018 releases were trained on different ones
InputNorm = Literal["paper", "kinetics", "kinetics-2018"]
# the training objectives of Table II; `methods.METHODS` gives each its class (a test checks that they agree)
MethodName = Literal["baseline", "baseline-aug", "self-kd", "kd", "skd-srl"]


@settings
class PreprocessConfig:
    dataset: Literal["ucf101", "hmdb51", "kinetics400", "folder", "synthetic"] = setting(
        "synthetic", "dataset adapter (its official file names and split files)"
    )
    out: str = setting("data/synthetic", "output directory (its layout: docs/format.md, 'The output folder')")
    root: str | None = setting(
        None, "dataset root holding the videos (synthetic: where to write them; default OUT/videos)"
    )
    splits_dir: str | None = setting(None, "folder with the official split files (default: look under ROOT)")
    split: int = setting(1, "official split number (UCF101, HMDB51: 1, 2 or 3)", at_least=1)
    format: Literal["jpeg", "vp9"] = setting(
        "jpeg", "jpeg: strips of JPEG frames (fast to decode); vp9: webm, 2.5-4.5x smaller, 7x the CPU to decode"
    )
    short_side: int = setting(
        128, "scale the shorter side of every frame to this many pixels", at_least=2, at_most=65535, multiple_of=2
    )
    fps: float | None = setting(
        None, "resample to this constant frame rate (default: the source's)", more_than=0, at_most=10_000
    )
    quality: int | None = setting(
        None,
        "jpeg: JPEG quality 1-100 (default 50; 90 before 2026-12); vp9: CRF 0-63 (default 32)",
        at_least=0,
        at_most=100,
    )
    frames_per_jpeg: int = setting(8, "jpeg: consecutive frames stacked into one JPEG strip", at_least=1, at_most=1024)
    optimize_huffman: bool = setting(
        True, "jpeg: Huffman tables fitted to each strip (2-4% fewer bytes, the same pixels), else libjpeg's standard"
    )
    shard_size_mb: float = setting(256.0, "start a new shard once one reaches this size", more_than=0)
    workers: int = setting(os.cpu_count() or 1, "videos transcoded at once", at_least=1)
    part: str | None = setting(None, "I/N: do the I-th of N deterministic parts (I from 1), e.g. one array job")
    limit: int | None = setting(
        None,
        "only the first N videos of each split's shuffled order (of the part, with --part): a sample of every class "
        "whose cost the summary projects onto the whole split",
        at_least=1,
    )
    resume: bool = setting(False, "continue an interrupted run in OUT; finished shards are kept")
    val_fraction: float = setting(
        0.1, "folder: fraction of each class held out as the test split", at_least=0, less_than=1
    )
    difficulty: Literal["normal", "hard"] = setting(
        "normal", "synthetic: normal, or hard (subtler motions, clutter, few videos in groups; for comparing methods)"
    )
    classes: int | None = setting(None, "synthetic: number of classes (default: normal 8, hard 12)")
    videos_per_class: int | None = setting(
        None, "synthetic: videos per class, train and test together (default: normal 60, hard 24)"
    )
    seed: int = setting(0, "seed for the synthetic videos and the order of samples in the shards")
    ffmpeg: str | None = setting(None, "ffmpeg binary (default: `ffmpeg` on PATH, else the one imageio-ffmpeg ships)")


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
        "apart by a hash of the video key (whole groups of clips where the file names give them: UCF101, HMDB51) and "
        "not trained on; 0: on the test split, the paper's protocol",
        at_least=0,
        at_most=0.5,
    )


def clips_per_video_field() -> Any:
    return setting(10, "clips per video, uniformly spaced", at_least=1)


@settings
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


@settings
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


@settings
class SamplingConfig:
    """How training draws its samples."""

    shuffle_buffer: int = setting(256, "samples held for shuffling (the shards are already shuffled)", at_least=1)
    same_clip: bool = setting(False, "make both views from one clip (default: two independently trimmed clips)")


@settings
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


@settings
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


@settings
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


@settings
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
        1,
        "windows per clip: 1 (the centre) or 3 (both ends and the centre of the long side, the Kinetics protocol)",
        one_of=(1, 3),
    )
    amp: Amp = amp_field()
    device: Device = device_field()
    clip: ClipConfig = setting(ClipConfig(), "clips (default: as the checkpoint was trained)")
    loader: LoaderConfig = setting(LoaderConfig(), "data loading")


@settings
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


@settings
class TrainConfig(TrainSettings):
    """`cli.py train`: one run. Also the schema of a saved run (its config.json, a checkpoint's "config")."""

    method: MethodName = setting("skd-srl", "training objective: the paper's method or one of its baselines")
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


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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
