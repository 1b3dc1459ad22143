"""`cli.py export`: a checkpoint as a folder (safetensors, config.json, a model card, ONNX) that loads as the
checkpoint did, whose card's snippet runs, whose ONNX model gives PyTorch's logits; and a folder from a stranger,
every field of its config.json checked, its weights read as safetensors only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from clickit import invoke
from conftest import config_reads, unread, write_checkpoint

from dali_skd.checkpoint import TrainedRun
from dali_skd.commands.export import ONNX_OPSET, ONNX_TOLERANCE, ExportConfig
from dali_skd.config import ClipConfig, TrainConfig
from dali_skd.models import build_model
from dali_skd.pretrained import init_from_pretrained

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"val_top1": 0.75, "val_top5": 1.0, "val_clip_top1": 0.625, "val_clip_top5": 1.0, "val_videos": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny run's checkpoint (clips of 8 frames, 32 pixels), with validation figures at its epoch 3 of 5."""
    root = tmp_path_factory.mktemp("export")
    cfg = TrainConfig(arch="r3d10-tiny", method="skd-srl", epochs=5, clip=ClipConfig(length=8, crop=32), val_clips=2)
    torch.manual_seed(0)
    path = write_checkpoint(root / "best.pt", cfg, classes=("walk", "run", "jump"))
    state = torch.load(path, weights_only=True)
    state.update(metrics={"epoch": 3, "loss": 0.5, **FIGURES, "best_top1": 0.75}, epoch=3, best_epoch=3)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def plain(checkpoint: Path) -> Path:
    """The checkpoint exported without ONNX."""
    out = checkpoint.parent / "plain"
    invoke("export", "--checkpoint", str(checkpoint), "--out", str(out))
    return out


@pytest.fixture(scope="module")
def folder(checkpoint: Path) -> Path:
    """The checkpoint exported with ONNX (its export and check take seconds)."""
    out = checkpoint.parent / "model"
    with config_reads() as reads:
        result = invoke("export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "onnx")
    assert unread(ExportConfig, reads) == []  # export offers no flag that does nothing
    assert f"exported {checkpoint} to {out}: model.safetensors, config.json, README.md, model.onnx" in result.output
    return out


@pytest.mark.slow
def test_the_folder_loads_as_the_checkpoint(checkpoint: Path, folder: Path) -> None:
    exported, original = TrainedRun.load(folder), TrainedRun.load(checkpoint)
    assert exported.classes == original.classes == ["walk", "run", "jump"]
    assert exported.config.clip == original.config.clip and exported.preprocessing == original.preprocessing
    assert exported.config.method == "skd-srl" and exported.config.shortcut == "A"  # the default, made explicit
    for name, tensor in original.classifier.state_dict().items():
        assert torch.equal(exported.classifier.state_dict()[name], tensor), name
    assert exported.figures == original.figures == {**FIGURES, "epoch": 3, "best_top1": 0.75, "best_epoch": 3,
                                                    "val_clips": 2}  # fmt: skip
    with pytest.raises(ValueError, match="is an exported model, its classifier only: the method's heads"):
        _ = exported.method
    config = json.loads((folder / "config.json").read_text())
    assert config["input"]["shape"] == ["batch", 3, 8, 32, 32]
    assert config["input"]["mean"] == config["input"]["std"] == [127.5] * 3  # --clip.norm paper: [-1, 1]
    assert config["preprocessing"]["short_side"] == 40 and config["training"]["objective"]["tau"] == 10.0

    model = build_model("r3d10-tiny", 3)  # --init takes the folder
    report = init_from_pretrained(model, folder)
    assert report.source == "dali-skd exported model" and not report.reinitialised and report.input_norm == "paper"
    assert torch.equal(model.fc.weight, original.classifier.fc.weight)


@pytest.mark.slow
def test_onnx_gives_pytorchs_logits_for_any_batch_size(checkpoint: Path, folder: Path) -> None:
    import onnx
    import onnxruntime

    graph = onnx.load(folder / "model.onnx")
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a named, free dimension
    recorded = json.loads((folder / "config.json").read_text())["onnx"]
    assert 0 <= recorded["max_abs_logit_diff"] < 1e-4 and recorded["tolerance"] == ONNX_TOLERANCE

    model = TrainedRun.load(checkpoint).classifier.eval()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = torch.randint(0, 256, (5, 3, 8, 32, 32), generator=torch.Generator().manual_seed(1)).float()
    clips = (pixels - 127.5) / 127.5  # the inputs the model was trained on
    with torch.no_grad():
        expected = model(clips).numpy()
    got = session.run(["logits"], {"clips": clips.numpy()})[0]
    largest = float(np.abs(got - expected).max())
    print(f"ONNX vs PyTorch, 5 clips of 3 x 8 x 32 x 32: largest logit difference {largest:.3g}")
    assert got.shape == (5, 3) and largest < 1e-4


@pytest.mark.slow
def test_the_model_card_says_what_a_colleague_needs_and_its_snippet_runs(folder: Path) -> None:
    card = (folder / "README.md").read_text()
    for heading in ("## Method", "## Data", "## Evaluation", "## Intended input", "## Use", "## Files"):
        assert heading in card
    assert "video-level top-1 75.00%, top-5 100.00% (4 videos, the softmax averaged over 2 centre clips" in card
    assert "loss Eq. 5: CE + CE + alpha L_KL + beta L_sim" in card and "tau 10.0, alpha 0.1, beta 1.0" in card
    assert "less mean [127.5, 127.5, 127.5], divided by std [127.5, 127.5, 127.5]" in card
    assert "short side is 40 px" in card and "8 consecutive frames" in card and "ONNX opset 20" in card
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=folder.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = json.loads(done.stdout.strip().replace("'", '"'))
    assert len(predicted) == 2 and set(predicted) <= {"walk", "run", "jump"}


@pytest.mark.slow
def test_export_refuses_a_used_folder_and_names_the_onnx_extra(
    checkpoint: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = invoke("export", "--checkpoint", str(checkpoint), "--out", str(folder), expect_error=True)
    assert "already holds model.safetensors, config.json, README.md, model.onnx: pass a new --out" in result.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    out = tmp_path / "model"
    result = invoke("export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "onnx", expect_error=True)
    assert result.output == (
        "Error: --format onnx needs the extra 'onnx' (onnxruntime is not installed): pip install -e '.[onnx]' in the "
        "clone of dali-skd (or pip install 'dali-skd[onnx]')\n"
    )
    assert not out.exists()  # nothing written


def test_a_checkpoint_without_figures_says_how_to_measure_them(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "last.pt", TrainConfig(arch="r3d10-tiny"))
    invoke("export", "--checkpoint", str(path), "--out", str(tmp_path / "m"))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "records no validation figures; measure them with `python cli.py eval --data DATA --checkpoint m`" in card
    assert json.loads((tmp_path / "m" / "config.json").read_text())["evaluation"] == {}


# -- a folder from a stranger --------------------------------------------------------------------------------------


def config_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))

    return apply


def pickled_weights(folder: Path) -> None:
    """A torch.save pickle in the safetensors file's place: never unpickled."""
    torch.save({"fc.weight": torch.zeros(3, 128)}, folder / "model.safetensors")


def weights_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    from safetensors.torch import load_file, save_file

    def apply(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        edit(weights)
        save_file(weights, folder / "model.safetensors")

    return apply


ONNX_ENTRY = {"file": "model.onnx", "opset": 20, "input": "clips", "output": "logits", "max_abs_logit_diff": 1e-7,
              "tolerance": 1e-3}  # fmt: skip
HOSTILE_FOLDERS = {
    "an unknown field": (config_edit(lambda c: c.update(code="rm -rf /")), "holds unknown fields code"),
    "a field missing": (config_edit(lambda c: c.pop("classes")), "lacks classes"),
    "another format version": (config_edit(lambda c: c.update(format_version=2)), "version 2, and this dali-skd"),
    "classes not names": (config_edit(lambda c: c.update(classes=[1, 2, 3])), "classes is not a list of class names"),
    "a negative crop": (config_edit(lambda c: c["clip"].update(crop=-1)), r"clip\.crop is -1; it must be at least 1"),
    "a clip setting missing": (config_edit(lambda c: c["clip"].pop("norm")), "clip must hold exactly length"),
    "an unknown arch": (config_edit(lambda c: c.update(arch="evil")), "not a model of this dali-skd"),
    "input edited": (config_edit(lambda c: c["input"].update(mean=[0, 0, 0])), "input does not match its clip"),
    "a training setting of another type": (
        config_edit(lambda c: c["training"]["optim"].update(lr="0.1")),
        r"training\.optim\.lr|optim\.lr is '0\.1', not a number",
    ),
    "arch inside training": (
        config_edit(lambda c: c["training"].update(arch="r3d50")),
        "training must hold the run's settings but arch, shortcut, clip",
    ),
    "preprocessing of another type": (
        config_edit(lambda c: c["preprocessing"].update(short_side="big")),
        "preprocessing.short_side is 'big', not an integer",
    ),
    "a figure not a number": (
        config_edit(lambda c: c["evaluation"].update(val_top1="99%")),
        "evaluation: val_top1 is '99%', not a finite number",
    ),
    "an onnx file outside the folder": (
        config_edit(lambda c: c.update(onnx={**ONNX_ENTRY, "file": "../../etc/passwd"})),
        "onnx: file is '../../etc/passwd', and the folder's model is model.onnx",
    ),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
    "config.json endless": (
        lambda f: (f / "config.json").unlink() or (f / "config.json").symlink_to("/dev/zero"),
        "no config.json in",  # not a regular file: never read
    ),
    "config.json huge": (
        lambda f: (f / "config.json").write_text(" " * (5 << 20) + "{}"),
        "config.json is over 4 MiB",
    ),
    "pickled weights": (pickled_weights, "model.safetensors is not a readable safetensors file"),
    "weights of another shape": (
        weights_edit(lambda w: w.update({"fc.weight": torch.zeros(5, 128)})),
        "size mismatch for fc.weight.*pass the folder `cli.py export` wrote, unchanged",
    ),
    "a tensor missing": (weights_edit(lambda w: w.pop("conv1.weight")), "Missing key.*conv1.weight"),
    "non-finite weights": (
        weights_edit(lambda w: w["fc.weight"].fill_(float("nan"))),
        "holds non-finite weights .* e.g. model.fc.weight",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_FOLDERS))
def test_a_hostile_folder_is_a_one_line_error(plain: Path, tmp_path: Path, case: str) -> None:
    edit, message = HOSTILE_FOLDERS[case]
    copy = tmp_path / "model"
    shutil.copytree(plain, copy)
    edit(copy)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TrainedRun.load(copy)
    result = invoke("eval", "--checkpoint", str(copy), "--data", str(tmp_path / "none"), expect_error=True)
    assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
