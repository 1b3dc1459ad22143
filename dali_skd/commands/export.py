"""`cli.py export`: a checkpoint as a folder a colleague can use without this project's checkpoint schema
(`exported.py`): model.safetensors, config.json and README.md, a model card that says what the model is, what it was
trained on and how, how well it scored when the checkpoint recorded it, what input it expects, and how to load it;
with `--format onnx` also model.onnx (batch size free), checked against PyTorch with onnxruntime on the CPU.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from dali_skd import __version__
from dali_skd.checkpoint import TrainedRun
from dali_skd.errors import OutputExists, RunFailed
from dali_skd.exported import (
    CARD_FILE,
    CONFIG_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    input_spec,
    model_config,
    write_config,
    write_weights,
)
from dali_skd.extras import require
from dali_skd.files import write_atomic
from dali_skd.methods import METHODS
from dali_skd.settings import setting, settings

ONNX_OPSET = 20  # ONNX's operator set the export targets (onnxruntime 1.20 and later run it)
ONNX_TOLERANCE = 1e-3  # largest |logit difference| between onnxruntime and PyTorch (fp32, CPU) an export passes
ONNX_CHECK_BATCHES = (1, 3)  # batch sizes compared: the batch dimension is free, not the 2 it was traced with


@settings
class ExportConfig:
    """`cli.py export`: a checkpoint as a folder of safetensors weights, config.json and a model card."""

    checkpoint: str = setting("runs/run/best.pt", "checkpoint of a run to export: its best.pt or last.pt")
    out: str = setting("models/model", "folder to write (new, or empty): model.safetensors, config.json, README.md")
    format: Literal["safetensors", "onnx"] = setting(
        "safetensors",
        f"onnx: also model.onnx (opset {ONNX_OPSET}, any batch size), checked against PyTorch with onnxruntime "
        "(the extra onnx)",
    )


def run_export(cfg: ExportConfig) -> Path:
    out = Path(cfg.out)
    taken = [name for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, ONNX_FILE) if (out / name).exists()]
    if taken:
        raise OutputExists(f"{out} already holds {', '.join(taken)}: pass a new --out, or remove them first")
    if cfg.format == "onnx":  # before anything is written
        for module in ("onnx", "onnxruntime", "onnxscript"):
            require(module, "onnx", "--format onnx")
    run = TrainedRun.load(cfg.checkpoint)
    run.classifier.eval()
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, run.classifier.state_dict())
    onnx = export_onnx(run, out / ONNX_FILE) if cfg.format == "onnx" else None
    config = model_config(run.config, run.classes, run.preprocessing, run.figures, Path(cfg.checkpoint).name, onnx)
    write_config(out, config)
    write_atomic(out / CARD_FILE, model_card(run, out, config))
    written = [WEIGHTS_FILE, CONFIG_FILE, CARD_FILE] + ([ONNX_FILE] if onnx else [])
    print(f"exported {cfg.checkpoint} to {out}: {', '.join(written)}")
    if onnx:
        print(
            f"{ONNX_FILE}: opset {onnx['opset']}, any batch size; onnxruntime's logits are within "
            f"{onnx['max_abs_logit_diff']:.2g} of PyTorch's (batches of {' and '.join(map(str, ONNX_CHECK_BATCHES))})"
        )
    return out


def export_onnx(run: TrainedRun, path: Path) -> dict[str, Any]:
    """The classifier as ONNX at `path` (input `clips`, batch x 3 x T x H x W; output `logits`), its batch size free;
    then run by onnxruntime on the CPU against PyTorch on random clips: config.json's `onnx` entry, with the largest
    difference in logits. A difference over `ONNX_TOLERANCE` is an error (and no model.onnx is left)."""
    import onnxruntime

    shape = input_spec(run.config.clip)["shape"][1:]
    model = run.classifier.float().eval()
    example = torch.randn(2, *shape)
    partial = path.with_suffix(".onnx.tmp")
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), _quiet("torch.onnx"):  # the exporter's notes on operators this model has not
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model, (example,), partial, input_names=["clips"], output_names=["logits"], opset_version=ONNX_OPSET,
            dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    largest = 0.0
    for n in ONNX_CHECK_BATCHES:
        clips = torch.randn(n, *shape, generator=generator)
        with torch.no_grad():
            expected = model(clips).numpy()
        got = session.run(["logits"], {"clips": clips.numpy()})[0]
        largest = max(largest, float(abs(got - expected).max()))
    if not largest <= ONNX_TOLERANCE:
        partial.unlink()
        raise RunFailed(
            f"{path}: onnxruntime's logits differ from PyTorch's by up to {largest:.3g} (over {ONNX_TOLERANCE:g}): "
            "the export is wrong; export without --format onnx, and report it with your torch and onnx versions"
        )
    partial.replace(path)
    return {
        "file": ONNX_FILE, "opset": ONNX_OPSET, "input": "clips", "output": "logits", "max_abs_logit_diff": largest,
        "tolerance": ONNX_TOLERANCE,
    }  # fmt: skip


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """`logger` (and those under it) say only errors in the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def model_card(run: TrainedRun, out: Path, config: dict[str, Any]) -> str:
    """README.md of the folder: what the model is, how it was trained and on what, how well it scored (when the
    checkpoint recorded it), the input it expects, and how to load it."""
    cfg, clip, spec = run.config, run.config.clip, config["input"]
    method = METHODS[cfg.method]
    augment = ", ".join(f"{k} {_shown(v)}" for k, v in asdict(cfg.augment).items()) if method.augment else "crop only"
    params = sum(p.numel() for p in run.classifier.parameters())
    classes = ", ".join(run.classes[:20]) + (
        f", ... ({len(run.classes)} in config.json)" if len(run.classes) > 20 else ""
    )
    pre = run.preprocessing
    frames = "JPEG frames" if pre["format"] == "jpeg" else "VP9 video"
    fps = f"{pre['fps']:g} frames/s" if pre["fps"] else "each video's own frame rate"
    settings = ", ".join(f"{name} {getattr(cfg.objective, name)}" for name in method.settings) or "none"
    optim = cfg.optim
    lines = [
        f"# {cfg.arch}, {cfg.method}, {len(run.classes)} classes",
        "",
        f"A 3D ResNet (Hara et al.; `{cfg.arch}`, shortcut {config['shortcut']}, {params / 1e6:.1f}M parameters) "
        f"that classifies video clips into {len(run.classes)} classes, trained with dali-skd's `{cfg.method}`. "
        f"Exported from `{config['exported_from']}` by `cli.py export` (dali-skd {__version__}).",
        "",
        "## Method",
        "",
        f"- `{cfg.method}`: {method.num_views} view{'s' * (method.num_views > 1)} of each training video, loss "
        f"{method.loss}; its settings: {settings}",
        f"- {cfg.epochs} epochs, {cfg.batch_size} samples a batch per process, SGD (lr {optim.lr:g}, momentum "
        f"{optim.momentum:g}, weight decay {optim.weight_decay:g}, encoder at {optim.lr_backbone:g} x lr), lr x "
        f"{optim.lr_factor:g} after {optim.lr_patience} epochs without validation improvement, seed {cfg.seed}",
        f"- augmentations: {augment}",
    ]
    if cfg.init:
        lines.append(f"- started from `{Path(cfg.init).name}`, frozen up to: {cfg.freeze}")
    if cfg.teacher:
        lines.append(f"- teacher: `{Path(cfg.teacher).name}`")
    lines += [
        "",
        "## Data",
        "",
        f"- trained on `{cfg.data}`: {classes}",
        f"- its videos were stored as {frames} at short side {pre['short_side']} px and {fps}",
        f"- clips of {_frames(clip.length, clip.frame_stride)}, {clip.crop} x {clip.crop} pixels",
        "",
        "## Evaluation",
        "",
        *_evaluation(run.figures, out),
        "",
        "## Intended input",
        "",
        f"- a float32 batch of clips, {' x '.join(map(str, spec['shape']))} (batch, RGB channels, frames, height, "
        "width)",
        f"- each clip: {_frames(clip.length, clip.frame_stride)} of a video at {fps}, scaled so that the short side "
        f"is {pre['short_side']} px, then a {clip.crop} x {clip.crop} window (evaluation: the centre, or 3 windows "
        "along the long side; the softmax averaged over 10 clips per video)",
        f"- values: pixels 0-255, less mean {spec['mean']}, divided by std {spec['std']} per channel (R, G, B) "
        f"(`--clip.norm {clip.norm}`)",
        "- output: logits, one per class in config.json's `classes` order; softmax gives probabilities",
        "",
        "## Use",
        "",
        "With the project (`pip install -e .` in a clone of dali-skd), as any checkpoint:",
        "",
        "```bash",
        f"python cli.py predict video.mp4 --checkpoint {out.name}",
        f"python cli.py eval --data DATA --checkpoint {out.name}",
        f"python cli.py train --data DATA --init {out.name} --out runs/finetune",
        "```",
        "",
        "In plain PyTorch, with the project's model definition:",
        "",
        "```python",
        *snippet(out.name, onnx=config["onnx"] is not None),
        "```",
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: the weights (tensors only), the state dict of `build_model(arch, len(classes), "
        "shortcut=shortcut)`",
        f"- `{CONFIG_FILE}`: architecture, classes, clip settings, input, preprocessing, the run's other settings "
        "(`training`), the evaluation figures",
    ]
    if onnx := config["onnx"]:
        lines.append(
            f"- `{ONNX_FILE}`: the same network, ONNX opset {onnx['opset']}, input `clips` (any batch size), output "
            f"`logits`; onnxruntime's logits were within {onnx['max_abs_logit_diff']:.2g} of PyTorch's (random clips, "
            f"batches of {' and '.join(map(str, ONNX_CHECK_BATCHES))}; tolerance {onnx['tolerance']:g})"
        )
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    return " to ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


def _frames(length: int, stride: int) -> str:
    return f"{length} consecutive frames" if stride == 1 else f"{length} frames, every {stride}th"


def _evaluation(figures: dict[str, float], out: Path) -> list[str]:
    if "val_top1" not in figures:
        return [
            "The checkpoint records no validation figures; measure them with "
            f"`python cli.py eval --data DATA --checkpoint {out.name}`."
        ]
    clips = figures.get("val_clips", 1)
    lines = [
        f"On the held-out split of the training data, after epoch {figures.get('epoch', '?')}: video-level top-1 "
        f"{figures['val_top1']:.2%}, top-5 {figures.get('val_top5', float('nan')):.2%} "
        f"({figures.get('val_videos', '?')} videos, the softmax averaged over {clips} centre clip{'s' * (clips != 1)} "
        f"per video); clip-level top-1 {figures.get('val_clip_top1', float('nan')):.2%}."
    ]
    if "best_top1" in figures:
        lines.append(
            f"The run's best validation top-1 was {figures['best_top1']:.2%}, at epoch "
            f"{figures.get('best_epoch', '?')}."
        )
    lines.append(f"`python cli.py eval --data DATA --checkpoint {out.name}` measures it with 10 clips per video.")
    return [" ".join(lines)]


def snippet(folder: str, onnx: bool) -> list[str]:
    """Python that loads the model with plain PyTorch and the project's `build_model`, and applies it to a random
    batch of pixels (the test runs it)."""
    lines = [
        "import json",
        "",
        "import torch",
        "from safetensors.torch import load_file",
        "",
        "from dali_skd.models import build_model",
        "",
        f"folder = {json.dumps(folder)}",
        'config = json.load(open(f"{folder}/config.json"))',
        'model = build_model(config["arch"], len(config["classes"]), shortcut=config["shortcut"])',
        'model.load_state_dict(load_file(f"{folder}/model.safetensors"))',
        "model.eval()",
        "",
        "# clips of RGB pixels 0-255 cut as 'Intended input' says (here: random), batch x 3 x frames x height x width",
        'pixels = torch.randint(0, 256, (2, *config["input"]["shape"][1:])).float()',
        'mean = torch.tensor(config["input"]["mean"]).view(1, 3, 1, 1, 1)',
        'std = torch.tensor(config["input"]["std"]).view(1, 3, 1, 1, 1)',
        "clips = (pixels - mean) / std",
        "with torch.no_grad():",
        "    probabilities = model(clips).softmax(dim=1)",
        'print([config["classes"][i] for i in probabilities.argmax(dim=1)])',
    ]
    if onnx:
        lines += [
            "",
            "# or with onnxruntime, no PyTorch needed",
            "import onnxruntime",
            "",
            'session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])',
            'logits = session.run(["logits"], {"clips": clips.numpy()})[0]',
        ]
    return lines
