"""Fine-tuning from pretrained weights: `--init` reads them into a fresh model (`--optim.lr-backbone`, the encoder's
share of the learning rate, lives with the step: `step.param_groups`; `--freeze` on the model: `ResNet3d.freeze`).

`--init` reads, with `torch.load(weights_only=True)` only (or, for a folder, safetensors):
- this project's checkpoints (`checkpoint.py`) and the folders `cli.py export` writes (`exported.py`);
- the Kinetics models of Hara et al. (kenshohara/3D-ResNets-PyTorch): a dict whose "state_dict" uses their
  names, which are ours but for the shortcut's (`downsample.0`/`.1` there, `shortcut.0`/`.1` here) and a
  "module." prefix in the 2018 release (saved from `nn.DataParallel`);
- a bare state dict in either naming.

The report also says which pixel values (`--clip.norm`) the file's model was trained on, where the layout tells:
Hara et al.'s 2018 and 2020 releases were trained on different ones, and neither on the paper's [-1, 1].

Every tensor of the model must come from the file, with three exceptions that are reported: a classifier `fc` of
another size (or none) keeps its fresh init, and BatchNorm `num_batches_tracked` counters missing from the file
(the 2018 release predates them; with a fixed momentum they are unused) or extra in it are skipped. Any other
difference is an error that says which --arch and --shortcut the file holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dali_skd.checkpoint import checked_state, classifier_state, load_failure, nonfinite_tensors, refused_global
from dali_skd.errors import InputError, MissingInput
from dali_skd.exported import read_model_folder
from dali_skd.models import MODELS, Bottleneck, ResNet3d

COUNTER = "num_batches_tracked"


@dataclass
class InitReport:
    """What `init_from_pretrained` did with each tensor of the model and the file."""

    path: str
    source: str  # the file's layout, in words
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # "key (shape in the file -> shape here)"
    missing: list[str] = field(default_factory=list)  # tolerated: BatchNorm counters only
    unexpected: list[str] = field(default_factory=list)  # tolerated: BatchNorm counters only
    input_norm: str | None = None  # the pixel values (`--clip.norm`) the file's model was trained on, when known

    def format(self) -> str:
        lines = [f"--init {self.path} ({self.source}): loaded {len(self.loaded)} tensors"]
        if self.reinitialised:
            lines.append(
                f"  re-initialised {len(self.reinitialised)} (the classifier does not fit this dataset): "
                + ", ".join(self.reinitialised)
            )
        for what, keys in (("missing from the file", self.missing), ("unexpected, skipped", self.unexpected)):
            lines.append(f"  {what}: {_names(keys) if keys else 'none'}")
        return "\n".join(lines)

    def input_norm_note(self, chosen: str) -> str | None:
        """A word when the run feeds the model other pixel values than the file's model was trained on: allowed
        (fine-tuning adapts), but seldom meant."""
        if self.input_norm is None or self.input_norm == chosen:
            return None
        return (
            f"  note: the file's model was trained on --clip.norm {self.input_norm} inputs, this run gives it "
            f"--clip.norm {chosen}: add --clip.norm {self.input_norm} unless you mean to change them"
        )


def _names(keys: list[str]) -> str:
    counters = [k for k in keys if k.endswith(COUNTER)]
    named = [k for k in keys if not k.endswith(COUNTER)]
    return ", ".join(named + ([f"{COUNTER} of {len(counters)} BatchNorm layers"] if counters else []))


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str, str | None]:
    """The tensors of a checkpoint file (or exported folder) under this project's names, the file's layout in words,
    and the `--clip.norm` its model was trained on if the layout tells (a dali-skd checkpoint's or folder's config;
    Hara et al.'s 2018 release, saved from DataParallel, or their 2020 one)."""
    path = Path(path)
    if path.is_dir():
        folder = read_model_folder(path)
        return folder.weights, "dali-skd exported model", folder.config.clip.norm
    if not path.is_file():
        raise MissingInput(f"--init: no file at {path}: pass a dali-skd checkpoint or a Kinetics model file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = refused_global(e)
        if refused is None or refused[1]:  # not a pickle of an object, or one that would run code: no way round
            raise InputError(f"--init: {path} is not a PyTorch checkpoint ({load_failure(e)})") from e
        resaved = path.with_name(path.stem + "-weights.pth")
        raise InputError(
            f"--init: {path} holds an object of class {refused[0]}, which torch.load(weights_only=True) refuses. "
            "If you trust the file, keep only its weights, in a Python session: "
            f"import torch; torch.save({{'state_dict': torch.load('{path}', map_location='cpu', "
            f"weights_only=False)['state_dict']}}, '{resaved}')  -- then pass --init {resaved}"
        ) from e

    if isinstance(raw, dict) and "checkpoint_version" in raw:
        run = checked_state(raw, path)
        return classifier_state(run, path), "dali-skd checkpoint", run["config"]["clip"]["norm"]
    norm = None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        weights, source = raw["state_dict"], "3D-ResNets-PyTorch checkpoint"
        norm = "kinetics-2018" if any(k.startswith("module.") for k in weights) else "kinetics"
    elif isinstance(raw, dict) and raw and all(isinstance(v, Tensor) for v in raw.values()):
        weights, source = raw, "state dict"
    else:
        raise InputError(
            f"--init: {path} is neither a dali-skd checkpoint nor a state dict (nor a dict with one under "
            "'state_dict'): pass a checkpoint of `cli.py train` or a Kinetics model of 3D-ResNets-PyTorch"
        )
    if any(k.startswith("module.") for k in weights):
        source += ", saved from DataParallel"
    return {hara_to_ours(k): v for k, v in weights.items()}, source, norm


def hara_to_ours(key: str) -> str:
    """Hara et al.'s name of a tensor (models/resnet.py) as `ResNet3d` names it."""
    return key.removeprefix("module.").replace(".downsample.", ".shortcut.")


def describe(state: dict[str, Tensor]) -> str | None:
    """The preset of `build_model` whose tensors `state` holds, as in "r3d50 with shortcut B"; None if none."""
    stem = state.get("conv1.weight")
    if stem is None or stem.dim() != 5:
        return None
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    shortcut = "B" if any(".shortcut." in k for k in state) else "A"
    for name, spec in MODELS.items():
        if (
            spec.layers == blocks
            and (spec.block is Bottleneck) == bottleneck
            and max(1, round(64 * spec.width)) == stem.shape[0]
            and spec.stem_t_kernel == stem.shape[2]
        ):
            return f"{name} with shortcut {shortcut}"
    return None


def init_from_pretrained(model: ResNet3d, path: str | Path) -> InitReport:
    """Loads the weights in `path` into `model`, all of them but a classifier of another size (see the module
    docstring); refuses a file made for another architecture, naming the first tensor that does not fit."""
    weights, source, input_norm = read_weights(path)
    report = InitReport(str(path), source, input_norm=input_norm)
    ours = model.state_dict()
    problems: list[str] = []
    for key, target in ours.items():
        if key.endswith(COUNTER) and key not in weights:
            report.missing.append(key)
        elif key.startswith("fc.") and (key not in weights or weights[key].shape != target.shape):
            was = tuple(weights[key].shape) if key in weights else "absent"
            report.reinitialised.append(f"{key} ({was} in the file, {tuple(target.shape)} here)")
        elif key not in weights:
            problems.append(f"it has no {key}")
        elif weights[key].shape != target.shape:
            problems.append(f"{key} is {tuple(weights[key].shape)} in the file, {tuple(target.shape)} in the model")
        else:
            report.loaded.append(key)
    for key in weights:
        if key not in ours:
            if key.endswith(COUNTER):
                report.unexpected.append(key)
            else:
                problems.append(f"the model has no {key}")
    if problems:
        theirs, mine = describe(weights), describe(ours)
        advice = (
            f"the file holds an {theirs}: pass --arch {theirs.replace(' with shortcut ', ' --shortcut ')}"
            if theirs is not None and theirs != mine
            else "pass the --arch and --shortcut the file was trained with, or another file"
        )
        raise InputError(
            f"--init: {path} does not fit the model ({mine or 'this --arch'}): {problems[0]} "
            f"({len(problems)} tensors differ); {advice}"
        )
    if bad := nonfinite_tensors({k: weights[k] for k in report.loaded}):
        raise InputError(
            f"--init: {path} holds non-finite weights ({len(bad)} of {len(report.loaded)} tensors, e.g. {bad[0]}): "
            "the run that wrote it diverged, or the file is damaged; pass another file"
        )
    model.load_state_dict({**ours, **{k: weights[k] for k in report.loaded}})
    return report
