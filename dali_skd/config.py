"""One typed configuration, shared by the CLI (every field is a flag of the same name), the code and the
saved run (`config.json` in the run directory). Defaults are the paper's."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from dali_skd.files import write_atomic

Device = Literal["auto", "cuda", "cpu"]  # auto: the GPU when CUDA is available, else the CPU
Amp = Literal["auto", "fp16", "bf16", "off"]  # auto: fp16 on CUDA, off (fp32) on the CPU
# the pixel values the network sees (`data.source.INPUT_NORMS`): the paper's [-1, 1], or those of Hara et al.'s
# Kinetics models (3D-ResNets-PyTorch), whose 2020 and 2018 releases were trained on different ones
InputNorm = Literal["paper", "kinetics", "kinetics-2018"]


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A field with its CLI help text."""
    if isinstance(default, list | dict | tuple) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PreprocessConfig:
    dataset: Literal["ucf101", "hmdb51", "kinetics400", "folder", "synthetic"] = _opt(
        "synthetic", "dataset adapter (its official file names and split files)"
    )
    out: str = _opt("data/synthetic", "output directory (its layout: docs/format.md, 'The output folder')")
    root: str | None = _opt(
        None, "dataset root holding the videos (synthetic: where to write them; default OUT/videos)"
    )
    splits_dir: str | None = _opt(None, "folder with the official split files (default: look under ROOT)")
    split: int = _opt(1, "official split number (UCF101, HMDB51: 1, 2 or 3)")
    format: Literal["jpeg", "vp9"] = _opt(
        "jpeg", "jpeg: strips of JPEG frames (fast to decode); vp9: webm, about 4x smaller"
    )
    short_side: int = _opt(128, "scale the shorter side of every frame to this many pixels")
    fps: float | None = _opt(None, "resample to this constant frame rate (default: the source's)")
    quality: int | None = _opt(None, "jpeg: JPEG quality 1-100 (default 90); vp9: CRF 0-63 (default 32)")
    frames_per_jpeg: int = _opt(8, "jpeg: consecutive frames stacked into one JPEG strip")
    shard_size_mb: float = _opt(256.0, "start a new shard once one reaches this size")
    workers: int = _opt(os.cpu_count() or 1, "videos transcoded at once")
    part: str | None = _opt(None, "I/N: do the I-th of N deterministic parts (I from 1), e.g. one array job")
    resume: bool = _opt(False, "continue an interrupted run in OUT; finished shards are kept")
    val_fraction: float = _opt(0.1, "folder: fraction of each class held out as the test split")
    difficulty: Literal["normal", "hard"] = _opt(
        "normal", "synthetic: normal, or hard (subtler motions, clutter, few videos in groups; for comparing methods)"
    )
    classes: int | None = _opt(None, "synthetic: number of classes (default: normal 8, hard 12)")
    videos_per_class: int | None = _opt(
        None, "synthetic: videos per class, train and test together (default: normal 60, hard 24)"
    )
    seed: int = _opt(0, "seed for the synthetic videos and the order of samples in the shards")
    ffmpeg: str | None = _opt(None, "ffmpeg binary (default: `ffmpeg` on PATH, else the one imageio-ffmpeg ships)")


@dataclass
class AugmentConfig:
    """The paper's augmentations; each applied independently with its probability, one draw per clip."""

    p_flip: float = _opt(0.5, "probability of a horizontal flip")
    p_contrast: float = _opt(0.5, "probability of a contrast change")
    contrast: tuple[float, float] = _opt((0.6, 1.4), "contrast factor range (1: unchanged)")
    p_brightness: float = _opt(0.5, "probability of a brightness change")
    brightness: tuple[float, float] = _opt((0.6, 1.4), "brightness factor range (1: unchanged)")
    p_hue: float = _opt(0.5, "probability of a hue rotation")
    hue: tuple[float, float] = _opt((-30.0, 30.0), "hue rotation range in degrees")
    p_blur: float = _opt(0.5, "probability of a Gaussian blur")
    blur_sigma: tuple[float, float] = _opt((0.1, 2.0), "Gaussian blur sigma range in pixels")
    p_channel_split: float = _opt(0.5, "probability of copying one random colour channel into all three")


@dataclass
class LoaderConfig:
    data: str = _opt(
        "data/synthetic",
        "dataset directory holding manifest.json, or an http(s):// URL prefix, or a pipe: command "
        "with {} for the file name (e.g. 'pipe:aws s3 cp s3://bucket/ucf101/{} -')",
    )
    train_shards: str | None = _opt(None, "training shards instead of the manifest's: brace patterns or URLs")
    eval_shards: str | None = _opt(None, "held-out shards instead of the manifest's: brace patterns or URLs")
    clip_len: int = _opt(16, "frames per clip")
    frame_stride: int = _opt(1, "take every S-th frame: a clip spans (clip_len - 1) x S + 1 frames of the video")
    input_norm: InputNorm = _opt(
        "paper",
        "pixel values the network sees: paper: [-1, 1]; kinetics: (x / 255 - mean) / std with the Kinetics mean "
        "and std of Hara et al.'s 2020 models; kinetics-2018: x - mean (0-255 pixels, ActivityNet mean), for their "
        "2018 models",
    )
    crop: int = _opt(112, "side of the square window cropped from every frame of a clip")
    same_clip: bool = _opt(False, "make both views from one clip (default: two independently trimmed clips)")
    clips_per_video: int = _opt(10, "evaluation: clips per video, uniformly spaced")
    shuffle_buffer: int = _opt(256, "samples held for shuffling (the shards are already shuffled)")
    threads: int = _opt(
        0,
        "DALI CPU threads (0: one per core, at most 16; on a GPU, each JPEG decoder's pool, 0: the cores shared "
        "among the decoders)",
    )
    prefetch: int = _opt(2, "batches DALI prepares ahead")
    device: Device = _opt("auto", "auto: the GPU when CUDA is available, else the CPU")
    hw_decoder_load: float = _opt(
        0.65, "GPU: share of the JPEG strips given to the hardware JPEG decoder (A100/H100/H200), the rest to CUDA"
    )
    preallocate_width_hint: int = _opt(
        -1, "GPU: widest strip the JPEG decoders preallocate for (-1: from the shards; 0: no preallocation)"
    )
    preallocate_height_hint: int = _opt(
        -1, "GPU: tallest strip the JPEG decoders preallocate for (-1: from the shards; 0: no preallocation)"
    )
    read_timeout: float = _opt(
        60.0,
        "http(s) and pipe: data: seconds without a byte before a read is cut and retried (3 tries, resuming where "
        "it was cut); a shard that still fails is skipped",
    )
    stall_timeout: float = _opt(
        300.0, "stop the run when no batch comes for this many seconds (keep it over 3x --read-timeout)"
    )
    max_bad_samples: int = _opt(
        100, "stop once more samples than this were skipped as damaged or unreadable (each is named in the log)"
    )


@dataclass
class ObjectiveConfig:
    tau: float = _opt(10.0, "softmax temperature of the self-distillation target (Eq. 2)")
    alpha: float = _opt(0.1, "weight of the KL term (Eq. 5)")
    beta: float = _opt(1.0, "weight of the Siamese term (Eq. 5)")
    kl_detach_target: bool = _opt(
        False,
        "stop the gradient through the soft target softmax((p1+p2)/tau) (the paper does not say; default: it flows)",
    )
    kl_tau_squared: bool = _opt(False, "scale the KL term by tau^2 as Hinton et al. do (paper: no)")
    proj_dim: int = _opt(2048, "projector g output width")
    pred_hidden: int = _opt(512, "predictor q hidden width")
    kd_tau: float = _opt(4.0, "kd baseline: temperature of teacher and student softmax (Hinton et al.)")
    kd_alpha: float = _opt(0.9, "kd baseline: loss = (1 - alpha) CE + alpha tau^2 KL(teacher || student)")


@dataclass
class TrainConfig:
    method: Literal["skd-srl", "self-kd", "kd", "baseline", "baseline-aug"] = _opt(
        "skd-srl", "training objective (the paper's method or one of its baselines)"
    )
    arch: str = _opt("r3d18", "encoder: r3d10, r3d18, r3d34, r3d50, r3d101, or a -tiny variant")
    out: str = _opt("runs/run", "run directory: config, metrics, checkpoints, curves")
    epochs: int = _opt(200, "training epochs")
    batch_size: int = _opt(32, "samples per GPU (or per process on the CPU)")
    lr: float = _opt(0.01, "SGD learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    lr_patience: int = _opt(10, "epochs without validation improvement before the lr is divided")
    lr_factor: float = _opt(0.1, "factor applied to the lr on a plateau")
    val_clips: int = _opt(1, "clips per video for the per-epoch validation (eval uses --clips-per-video)")
    shortcut: Literal["A", "B"] | None = _opt(
        None,
        "encoder shortcut: A (zero-padded identity) or B (1x1x1 conv + BN); default: A for r3d10/18/34, B for 50/101",
    )
    init: str | None = _opt(
        None,
        "start from these weights, not a resume (optimizer, epoch and schedule start fresh): a dali-skd checkpoint "
        "or a Kinetics model of Hara et al. (e.g. r3d18_K_200ep.pth); a classifier of another size is re-initialised",
    )
    freeze: Literal["none", "stem", "layer1", "layer2", "layer3", "layer4", "encoder"] = _opt(
        "none",
        "fix the encoder up to and including this stage (stem: conv1 + bn1; encoder: all of it, a linear probe): "
        "no gradients, BatchNorm statistics kept",
    )
    lr_backbone: float = _opt(1.0, "the encoder learns at this times --lr; fc and the method's heads at --lr")
    teacher: str | None = _opt(None, "kd: checkpoint of the frozen teacher (e.g. a trained r3d50)")
    amp: Amp = _opt("auto", "mixed precision (auto: fp16 on CUDA, off on CPU)")
    channels_last: bool = _opt(True, "channels_last_3d memory layout on CUDA")
    seed: int = _opt(0, "seed for weights, data order and augmentation draws")
    resume: bool | Literal["auto"] = _opt(
        False, "continue from OUT/last.pt (it must exist); --resume auto: continue if OUT holds one, else start"
    )
    log_every: int = _opt(
        20, "steps between TensorBoard scalars and checks of the loss (and, under torchrun, of a stop signal)"
    )
    loader: LoaderConfig = _opt(LoaderConfig(), "data loading")
    augment: AugmentConfig = _opt(AugmentConfig(), "augmentations")
    objective: ObjectiveConfig = _opt(ObjectiveConfig(), "loss terms")
    max_skipped_steps: int = _opt(
        100, "fp16: stop when the grad scaler skips this many steps in a row (their gradients overflow at any scale)"
    )


@dataclass
class EvalConfig:
    checkpoint: str = _opt("runs/run/best.pt", "checkpoint to evaluate (best.pt or last.pt of a run)")
    split: str | None = _opt(None, "split to evaluate (default: test, or val for Kinetics)")
    batch_size: int = _opt(32, "clips per batch")
    amp: Amp = _opt("auto", "mixed precision (auto: fp16 on CUDA, off on CPU)")
    spatial_crops: int = _opt(
        1, "windows per clip: 1 (the centre) or 3 (both ends and the centre of the long side, the Kinetics protocol)"
    )
    json: str | None = _opt(
        None,
        "also write the results to this JSON file, the per-video predictions to <stem>.predictions.jsonl and the "
        "confusion matrix to <stem>.confusion.png beside it",
    )
    loader: LoaderConfig = _opt(LoaderConfig(), "data loading")


@dataclass
class ClipsConfig:
    """How `predict` and `features` cut videos into clips for a checkpoint: an unset field takes the value the
    checkpoint was trained with (its config's loader settings), so the model sees the clips it learned on."""

    clips_per_video: int | None = _opt(None, "clips per video, uniformly spaced (default: the checkpoint's)")
    spatial_crops: int = _opt(
        1, "windows per clip: 1 (the centre) or 3 (both ends and the centre of the long side, the Kinetics protocol)"
    )
    clip_len: int | None = _opt(None, "frames per clip (default: the checkpoint's)")
    frame_stride: int | None = _opt(None, "take every S-th frame (default: the checkpoint's)")
    crop: int | None = _opt(None, "side of the square window cropped from every frame (default: the checkpoint's)")
    input_norm: InputNorm | None = _opt(
        None, "pixel values the network sees: paper, kinetics or kinetics-2018 (default: the checkpoint's)"
    )
    batch_size: int = _opt(32, "clips per batch")
    amp: Amp = _opt("auto", "mixed precision (auto: fp16 on CUDA, off on CPU)")
    device: Device = _opt("auto", "auto: the GPU when CUDA is available, else the CPU")
    threads: int = _opt(0, "DALI CPU threads (0: one per core, at most 16)")

    def loader_config(self, trained: LoaderConfig, data: str) -> LoaderConfig:
        """The checkpoint's loader settings `trained`, reading `data`, with the fields set here replacing its own."""
        chosen = {
            name: getattr(self, name)
            for name in ("clips_per_video", "clip_len", "frame_stride", "crop", "input_norm")
            if getattr(self, name) is not None
        }
        return dataclasses.replace(
            trained, data=data, train_shards=None, eval_shards=None, device=self.device, threads=self.threads, **chosen
        )


@dataclass
class PredictConfig:
    checkpoint: str = _opt("runs/run/best.pt", "checkpoint to apply (best.pt or last.pt of a run)")
    top_k: int = _opt(5, "classes listed per video, most probable first")
    json: str | None = _opt(None, "also write the predictions to this JSON file")
    short_side: int | None = _opt(
        None, "transcode to this short side (default: the checkpoint's, from its dataset's manifest)"
    )
    fps: float | None = _opt(
        None, "transcode to this frame rate (default: the checkpoint's, from its dataset's manifest)"
    )
    workers: int = _opt(os.cpu_count() or 1, "videos transcoded at once")
    clips: ClipsConfig = _opt(ClipsConfig(), "clips")


@dataclass
class FeaturesConfig:
    data: str = _opt(
        "data/synthetic", "dataset directory holding manifest.json, or an http(s):// URL prefix, or a pipe: command"
    )
    checkpoint: str = _opt("runs/run/best.pt", "checkpoint whose encoder gives the features")
    out: str = _opt("features", "output directory: <split>.npy (float16, videos x channels) and <split>.jsonl")
    clips: ClipsConfig = _opt(ClipsConfig(), "clips")


@dataclass
class CompareConfig:
    """`cli.py compare`: the same training settings for every method x seed."""

    methods: str = _opt("baseline,baseline-aug,kd,self-kd,skd-srl", "methods to compare, comma-separated")
    seeds: int = _opt(3, "runs per method, with seeds 0, 1, ...")
    teacher_arch: str | None = _opt(
        None, "kd without --teacher: the teacher compare trains first (default r3d50; r3d50-tiny for -tiny students)"
    )
    teacher_epochs: int | None = _opt(None, "kd without --teacher: the teacher's epochs (default: --epochs)")
    train: TrainConfig = _opt(
        TrainConfig(out="runs/compare"),
        "every run's settings; --out is the comparison's folder, --teacher a trained kd teacher",
    )


@dataclass
class BenchConfig:
    loaders: str = _opt(
        "dali,dataloader",
        "loaders to measure, comma-separated: host (the host side alone), dali, dataloader, and the loaders users "
        "pick instead, each a DataLoader over video files: decord, pyav, torchcodec (pip install -e '.[peers]')",
    )
    batch_size: int = _opt(64, "two-view samples per batch")
    seconds: float = _opt(30.0, "measuring time per loader and round, after warm-up")
    repeats: int = _opt(5, "the measuring time is split into this many windows; the median is reported")
    workers: int = _opt(os.cpu_count() or 1, "DataLoader worker processes of the baseline")
    train_arch: str | None = _opt(None, "also measure training steps of this encoder (e.g. r3d18)")
    train_batch_size: int = _opt(32, "samples per training step")
    amp: Amp = _opt("auto", "training precision (auto: fp16 on CUDA, off on CPU)")
    channels_last: bool = _opt(True, "channels_last_3d for the training steps on CUDA")
    json: str | None = _opt(None, "also write the figures to this JSON file")
    loader: LoaderConfig = _opt(LoaderConfig(), "data loading")
    augment: AugmentConfig = _opt(AugmentConfig(), "augmentations")
    rounds: int = _opt(3, "rounds; in each, every loader is measured once, one after another; the median is reported")
    augment_policy: Literal["crop-flip", "paper"] = _opt(
        "paper",
        "what every loader applies: crop-flip (a random crop and flip per view) or paper (the paper's six "
        "augmentations, with the --p-* and range flags)",
        flag="augment",
    )
    videos: str | None = _opt(
        None,
        "the peers' videos: the dataset's root, where the sources preprocess recorded lie (default DATA/videos, "
        "where the synthetic set keeps them), or a class-folder tree DIR/<class>/<video>",
    )
    videos_as_is: bool = _opt(
        False, "the peers read the videos as they are, not re-encoded to the dataset's short side and frame rate"
    )
    cache: str = _opt(
        "runs/bench-cache", "where the peers' re-encoded videos are kept and reused, a folder per dataset and setting"
    )


@dataclass
class PreviewConfig:
    """`cli.py preview`: what the training loader feeds the network, drawn, with the augmentations it drew."""

    split: str = _opt("train", "the split whose samples are drawn")
    samples: int = _opt(4, "samples drawn: the first usable ones of the split")
    frames: int = _opt(4, "frames drawn of each view, evenly spaced over its clip")
    compare_baseline: bool = _opt(
        False, "also draw the DataLoader baseline's views of the same samples with the same draws, under DALI's"
    )
    out: str = _opt("views.png", "the PNG to write")
    seed: int = _opt(0, "seed for the clips' starts and the augmentations' draws")
    loader: LoaderConfig = _opt(LoaderConfig(), "data loading")
    augment: AugmentConfig = _opt(AugmentConfig(), "augmentations")


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a (possibly partial) nested dict; unknown keys are an error that names them."""
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown setting {key!r} (known: {', '.join(fields)})")
        sub = _nested_type(cls, key)
        if sub is not None:
            value = from_dict(sub, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _nested_type(cls: type, name: str) -> type | None:
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = default.default_factory() if default.default_factory is not dataclasses.MISSING else None
    return type(value) if dataclasses.is_dataclass(value) else None


def save_json(cfg: Any, path: str | Path) -> None:
    write_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e
    return from_dict(cls, raw, str(path))


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
