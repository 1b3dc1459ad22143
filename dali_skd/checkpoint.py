"""One checkpoint dict for everything (torchvision's reference recipe): the method's state dict (the classifier
under `model.`, then the method's heads), optimizer, lr scheduler, grad scaler, finished epochs, RNG state and the
run's config, so resuming is one code path. Written atomically (`files.open_atomic`); read with
`weights_only=True` (tensors and plain containers only). Older checkpoints also hold the classifier on its own,
under "model"; they still load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dali_skd.config import TrainConfig, from_dict
from dali_skd.files import open_atomic
from dali_skd.models import ResNet3d, build_model

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Written atomically: a run killed while saving leaves the previous checkpoint intact."""
    with open_atomic(path) as f:
        torch.save({**state, "checkpoint_version": CHECKPOINT_VERSION}, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the last.pt or best.pt of a `cli.py train` run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable dali-skd checkpoint ({e})") from e
    return check_version(state, path)


def check_version(state: object, path: str | Path) -> dict[str, Any]:
    """`state` itself, if it is a checkpoint dict of the version this code writes."""
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a dali-skd checkpoint of version {CHECKPOINT_VERSION}")
    return state


def classifier_state(state: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The classifier's (encoder + `fc`) state dict in a checkpoint: the "model." entries of the method's state
    dict, or the "model" an older checkpoint holds beside it (the same tensors)."""
    if "model" in state:
        return state["model"]
    weights = {k.removeprefix("model."): v for k, v in state.get("method", {}).items() if k.startswith("model.")}
    if not weights:
        raise ValueError(f"{path} holds no model weights (neither 'model' nor 'method'): pass a checkpoint of a run")
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
        raise ValueError(
            f"{path} holds non-finite weights ({len(bad)} of {len(weights)} tensors, e.g. {bad[0]}): the run that "
            "wrote it diverged; use an earlier checkpoint, or train again with a lower --lr"
        )


def load_classifier(path: str | Path, device: torch.device, num_classes: int | None = None) -> tuple[ResNet3d, dict]:
    """The trained classifier of a checkpoint (and the checkpoint), checked against the dataset's class count and
    for non-finite weights."""
    state = load_checkpoint(path, device)
    cfg = from_dict(TrainConfig, state["config"], f"{path} config")
    classes = state["classes"]
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"{path} was trained on {len(classes)} classes, this dataset has {num_classes}: "
            "use a checkpoint trained on the same dataset"
        )
    weights = classifier_state(state, path)
    check_finite(weights, path)
    model = build_model(cfg.arch, len(classes), shortcut=cfg.shortcut)
    model.load_state_dict(weights)
    return model.to(device), state


CLIP_SETTINGS = ("clip_len", "frame_stride", "crop", "input_norm")  # what the model saw, which evaluation repeats


def trained_clip_settings(path: str | Path) -> dict[str, Any]:
    """The loader's clip settings a checkpoint was trained with (`CLIP_SETTINGS`); none for a file that is not a
    readable checkpoint (loading it properly then says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        loader = state["config"]["loader"]
    except Exception:
        return {}
    return {name: loader[name] for name in CLIP_SETTINGS if name in loader}
