"""A trained model as a folder others can use without this project's checkpoint, the way timm and Hugging Face share
models (`cli.py export` writes it):

    model.safetensors   the classifier's weights (encoder + fc), tensors only: reading them runs no code
    config.json         what the model is and expects: `model_config` (architecture, classes, clip settings, input
                        normalisation, how the training videos were preprocessed, the run's other settings, its
                        validation figures when the checkpoint had them, model.onnx's when there is one)
    README.md           the model card (`commands/export.py`)
    model.onnx          with `cli.py export --format onnx`

`read_model_folder` reads one back for `TrainedRun.load` (so `eval`, `predict`, `features` and `--teacher` take the
folder), and `--init`. A folder may come from anyone: every field of config.json is checked, and the weights are
read from the safetensors file only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from dali_skd import __version__
from dali_skd.config import ClipConfig, PreprocessConfig, TrainConfig, from_dict, to_dict
from dali_skd.data.source import INPUT_NORMS
from dali_skd.errors import InputError, MissingInput
from dali_skd.files import write_atomic
from dali_skd.format import PREPROCESSING_SETTINGS
from dali_skd.models import MODELS

FOLDER_FORMAT, FOLDER_VERSION = "dali-skd-model", 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, ONNX_FILE = "model.safetensors", "config.json", "README.md", "model.onnx"
MAX_CONFIG_BYTES = 4 << 20  # config.json: a few KiB, 50 KiB with Kinetics-700's class names
TOP_SETTINGS = ("arch", "shortcut", "clip")  # the run's settings config.json holds at its top; the rest: "training"
# a checkpoint's validation figures (its metrics line's names) that config.json and the card carry
EVALUATION_FIELDS = (
    "epoch", "val_top1", "val_top5", "val_clip_top1", "val_clip_top5", "val_videos", "val_clips", "best_top1",
    "best_epoch",
)  # fmt: skip
ONNX_FIELDS = {"file": str, "opset": int, "input": str, "output": str, "max_abs_logit_diff": float, "tolerance": float}
FIELDS = (
    "format", "format_version", "arch", "shortcut", "classes", "clip", "input", "preprocessing", "training",
    "evaluation", "onnx", "exported_from", "dali_skd_version",
)  # fmt: skip


def input_spec(clip: ClipConfig) -> dict[str, Any]:
    """What the network takes: a batch of clips of RGB pixel values (0-255), each channel less its mean and divided
    by its std (`--clip.norm`)."""
    mean, std = INPUT_NORMS[clip.norm]
    return {
        "shape": ["batch", 3, clip.length, clip.crop, clip.crop],
        "layout": "N x C x T x H x W: batch, RGB channels, frames, height, width",
        "dtype": "float32",
        "values": "(pixel - mean) / std per channel, pixels 0-255",
        "mean": [round(m, 4) for m in mean],
        "std": [round(s, 4) for s in std],
        "norm": clip.norm,
    }


def model_config(
    config: TrainConfig,
    classes: list[str],
    preprocessing: dict[str, Any],
    evaluation: dict[str, float],
    exported_from: str,
    onnx: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json of a model trained with `config` (a run's settings)."""
    settings = to_dict(config)
    return {
        "format": FOLDER_FORMAT,
        "format_version": FOLDER_VERSION,
        "arch": config.arch,
        "shortcut": config.shortcut or MODELS[config.arch].shortcut,
        "classes": classes,
        "clip": asdict(config.clip),
        "input": input_spec(config.clip),
        "preprocessing": preprocessing,
        "training": {k: v for k, v in settings.items() if k not in TOP_SETTINGS},
        "evaluation": evaluation,
        "onnx": onnx,
        "exported_from": exported_from,
        "dali_skd_version": __version__,
    }


def write_config(folder: Path, config: dict[str, Any]) -> None:
    write_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_weights(folder: Path, weights: dict[str, Tensor]) -> None:
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    write_atomic(folder / WEIGHTS_FILE, save(tensors, metadata={"format": "pt", "producer": FOLDER_FORMAT}))


@dataclass
class ModelFolder:
    """A folder `cli.py export` wrote, checked."""

    path: Path
    config: TrainConfig  # the run's settings (arch, shortcut and clip from the top of config.json)
    classes: list[str]
    preprocessing: dict[str, Any]
    evaluation: dict[str, float]
    weights: dict[str, Tensor]  # the classifier's state dict (empty if not asked for)


def read_model_folder(path: str | Path, with_weights: bool = True) -> ModelFolder:
    """The folder at `path`, every field of its config.json checked, its weights read from model.safetensors."""
    folder = Path(path)
    where = folder / CONFIG_FILE
    raw = _read_json(where)
    missing, unknown = [k for k in FIELDS if k not in raw], [k for k in raw if k not in FIELDS]
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"holds unknown fields {', '.join(unknown)}"
        raise InputError(f"{where} {what}: pass a folder written by `cli.py export`, unchanged")
    if (raw["format"], raw["format_version"]) != (FOLDER_FORMAT, FOLDER_VERSION):
        raise InputError(
            f"{where} is format {raw['format']!r:.40} version {raw['format_version']!r:.20}, and this dali-skd reads "
            f"{FOLDER_FORMAT!r} version {FOLDER_VERSION}: export the model again with this dali-skd"
        )
    classes = raw["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and 0 < len(c) <= 200 for c in classes)):
        raise InputError(f"{where}: classes is not a list of class names (each 1 to 200 characters)")
    parts = (("clip", ClipConfig, [f.name for f in fields(ClipConfig)]),
             ("preprocessing", PreprocessConfig, list(PREPROCESSING_SETTINGS)))  # fmt: skip
    for name, settings, expected in parts:
        if not isinstance(raw[name], dict) or sorted(raw[name]) != sorted(expected):
            raise InputError(f"{where}: {name} must hold exactly {', '.join(expected)}")
        from_dict(settings, raw[name], f"{where} {name}")
    training = raw["training"]
    if not isinstance(training, dict) or any(k in training for k in TOP_SETTINGS):
        raise InputError(
            f"{where}: training must hold the run's settings but {', '.join(TOP_SETTINGS)} (those are at the top)"
        )
    top = {k: raw[k] for k in TOP_SETTINGS}
    config = from_dict(TrainConfig, {**training, **top}, str(where))
    if config.shortcut is None or config.arch not in MODELS:
        raise InputError(f"{where}: arch {config.arch!r:.40} with shortcut {config.shortcut!r}: not a model of this "
                         f"dali-skd (known: {', '.join(MODELS)})")  # fmt: skip
    if raw["input"] != input_spec(config.clip):
        raise InputError(f"{where}: input does not match its clip settings (edited by hand?): export the model again")
    evaluation = _numbers(raw["evaluation"], EVALUATION_FIELDS, f"{where}: evaluation")
    if raw["onnx"] is not None:
        _check_onnx(raw["onnx"], folder)
    for name in ("exported_from", "dali_skd_version"):
        if not isinstance(raw[name], str) or len(raw[name]) > 1000:
            raise InputError(f"{where}: {name} is not text")
    weights = _read_weights(folder / WEIGHTS_FILE) if with_weights else {}
    return ModelFolder(folder, config, classes, raw["preprocessing"], evaluation, weights)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInput(
            f"no {CONFIG_FILE} in {path.parent}: pass a folder written by `cli.py export`, or a checkpoint file"
        )
    with open(path, "rb") as f:
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise InputError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MiB, not a model's config: export the model again")
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}): export the model again") from e
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a JSON object: pass a folder written by `cli.py export`")
    return raw


def _numbers(raw: Any, names: tuple[str, ...], where: str) -> dict[str, float]:
    """`raw`: an object of finite numbers under some of `names`."""
    if not isinstance(raw, dict):
        raise InputError(f"{where} is not an object of figures")
    for key, value in raw.items():
        if key not in names:
            raise InputError(f"{where}: unknown figure {key!r:.40} (known: {', '.join(names)})")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise InputError(f"{where}: {key} is {value!r:.40}, not a finite number")
    return raw


def _check_onnx(raw: Any, folder: Path) -> None:
    where = f"{folder / CONFIG_FILE}: onnx"
    if not isinstance(raw, dict) or sorted(raw) != sorted(ONNX_FIELDS):
        raise InputError(f"{where} must hold exactly {', '.join(ONNX_FIELDS)}")
    for key, kind in ONNX_FIELDS.items():
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise InputError(f"{where}: {key} is {raw[key]!r:.40}, not {kind.__name__}")
    if raw["file"] != ONNX_FILE or not (folder / ONNX_FILE).is_file():
        raise InputError(f"{where}: file is {raw['file']!r:.60}, and the folder's model is {ONNX_FILE}, which it holds")


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise MissingInput(f"no {WEIGHTS_FILE} in {path.parent}: pass a folder written by `cli.py export`")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors' SafetensorError, a file cut short, ...
        raise InputError(f"{path} is not a readable safetensors file ({e}): export the model again") from e
