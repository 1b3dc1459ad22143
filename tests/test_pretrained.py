"""`train --init`, `--shortcut`, `--freeze` and `--optim.lr-backbone`: files in the layouts of Hara et al.'s two
releases and of this project, written with torch.save as they were, give the model the weights they hold."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from test_train import tiny
from torch import Tensor, nn

from dali_skd.checkpoint import CHECKPOINT_VERSION, TrainedRun, classifier_state, load_checkpoint
from dali_skd.cli_options import build_config
from dali_skd.config import ConfigError, ObjectiveConfig, OptimConfig, TrainConfig
from dali_skd.distributed import init_distributed
from dali_skd.methods import build_method
from dali_skd.models import FREEZE_POINTS, ResNet3d, Shortcut, build_model
from dali_skd.pretrained import init_from_pretrained
from dali_skd.step import param_groups
from dali_skd.training import Trainer, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of 12-frame noise videos told apart by their tint, 8 for training and 4 for testing."""
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(12)]
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, {"train": videos[:8], "test": videos[8:]}, ["a", "b"], per_shard=2)


def kinetics_model(arch: str, classes: int, shortcut: Shortcut, seed: int) -> ResNet3d:
    """A model in eval mode whose every tensor, BatchNorm statistics included, differs from a fresh init."""
    torch.manual_seed(seed)
    model = build_model(arch, classes, shortcut=shortcut)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def hara_names(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our tensors under the names of kenshohara/3D-ResNets-PyTorch models/resnet.py (`prefix` "module.": saved
    from nn.DataParallel, as in the 2018 release)."""
    return {prefix + k.replace(".shortcut.", ".downsample."): v for k, v in state.items()}


def save_2018_file(model: ResNet3d, path: Path) -> Path:
    """The 2018 release: "module." prefix, no BatchNorm counters (PyTorch 0.3), PyTorch's legacy file format."""
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"epoch": 200, "arch": "resnet-18", "state_dict": hara_names(weights, "module.")}
    torch.save({**state, "optimizer": optimizer.state_dict()}, path, _use_new_zipfile_serialization=False)
    return path


def clips(seed: int = 0) -> Tensor:
    return torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_hara_2020_file_gives_the_features_of_the_same_weights(tmp_path: Path) -> None:
    source = kinetics_model("r3d18", 700, "B", seed=1)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [50, 100])  # its state holds a Counter
    path = tmp_path / "r3d18_K_200ep.pth"
    torch.save(
        {
            "epoch": 200,
            "arch": "resnet-18",
            "state_dict": hara_names(source.state_dict()),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        path,
    )
    torch.manual_seed(2)
    model = build_model("r3d18", 5, shortcut="B")
    fresh_fc = model.fc.weight.clone()

    report = init_from_pretrained(model, path)

    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(clips()), source.forward_features(clips()))
    assert torch.equal(model.fc.weight, fresh_fc)
    assert len(report.loaded) == len(source.state_dict()) - 2
    assert report.reinitialised == [
        "fc.weight ((700, 512) in the file, (5, 512) here)",
        "fc.bias ((700,) in the file, (5,) here)",
    ]
    assert report.missing == [] and report.unexpected == []
    text = report.format()
    assert f"--init {path} (3D-ResNets-PyTorch checkpoint): loaded {len(report.loaded)} tensors" in text
    assert "re-initialised 2 (the classifier does not fit this dataset): fc.weight" in text
    assert report.input_norm == "kinetics" and report.input_norm_note("kinetics") is None
    assert "add --clip.norm kinetics unless" in str(report.input_norm_note("paper"))


def test_hara_2018_file_gives_the_logits_of_the_same_weights(tmp_path: Path) -> None:
    source = kinetics_model("r3d18", 400, "A", seed=3)
    path = save_2018_file(source, tmp_path / "resnet-18-kinetics.pth")
    model = build_model("r3d18", 400)  # shortcut A: the preset's

    report = init_from_pretrained(model, path)

    with torch.no_grad():
        torch.testing.assert_close(model.eval()(clips()), source(clips()))
    counters = [k for k in source.state_dict() if k.endswith("num_batches_tracked")]
    assert len(report.loaded) == len(source.state_dict()) - len(counters)
    assert report.reinitialised == [] and report.missing == counters and report.unexpected == []
    assert report.source == "3D-ResNets-PyTorch checkpoint, saved from DataParallel"
    assert report.input_norm == "kinetics-2018"  # 0-255 pixels less the ActivityNet mean, as that release trained
    assert f"missing from the file: num_batches_tracked of {len(counters)} BatchNorm layers" in report.format()


def test_a_file_of_another_arch_is_refused_with_what_to_pass(tmp_path: Path) -> None:
    path = tmp_path / "r3d50_KM_200ep.pth"
    torch.save({"state_dict": hara_names(build_model("r3d50", 1039).state_dict())}, path)
    with pytest.raises(ValueError) as error:
        init_from_pretrained(build_model("r3d18", 101), path)
    assert str(error.value).startswith(f"--init: {path} does not fit the model (r3d18 with shortcut A): ")
    assert "layer1.0.conv1.weight is (64, 64, 1, 1, 1) in the file, (64, 64, 3, 3, 3) in the model" in str(error.value)
    assert str(error.value).endswith("the file holds an r3d50 with shortcut B: pass --arch r3d50 --shortcut B")


@pytest.mark.parametrize(
    ("file_shortcut", "model_shortcut", "first_problem"),
    [("A", "B", "it has no layer2.0.shortcut.0.weight"), ("B", "A", "the model has no layer2.0.shortcut.0.weight")],
)
def test_a_file_with_the_other_shortcut_is_refused(
    tmp_path: Path, file_shortcut: Shortcut, model_shortcut: Shortcut, first_problem: str
) -> None:
    path = tmp_path / "weights.pth"
    weights = build_model("r3d10-tiny", 4, shortcut=file_shortcut).state_dict()
    torch.save({"state_dict": hara_names(weights)}, path)
    with pytest.raises(ValueError, match=first_problem) as error:
        init_from_pretrained(build_model("r3d10-tiny", 4, shortcut=model_shortcut), path)
    assert f"pass --arch r3d10-tiny --shortcut {file_shortcut}" in str(error.value)


def test_a_partial_file_is_refused(tmp_path: Path) -> None:
    weights = build_model("r3d10-tiny", 4).state_dict()
    del weights["layer4.0.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(weights, path)
    model = build_model("r3d10-tiny", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"it has no layer4\.0\.conv2\.weight \(1 tensors differ\); pass the --arch"):
        init_from_pretrained(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


@pytest.mark.slow
def test_a_file_weights_only_refuses_says_how_to_keep_its_weights(tmp_path: Path) -> None:
    source = kinetics_model("r3d10-tiny", 400, "A", seed=4)
    path = tmp_path / "resnet-10-kinetics.pth"
    torch.save({"state_dict": hara_names(source.state_dict(), "module."), "opt": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(
        ValueError,
        match=r"holds an object of class argparse\.Namespace, which torch\.load\(weights_only=True\) refuses",
    ) as error:
        init_from_pretrained(build_model("r3d10-tiny", 400), path)
    message = str(error.value)
    assert str(path) in message
    snippet, then = message.split("in a Python session: ")[1].split("  -- then pass --init ")
    subprocess.run([sys.executable, "-c", snippet], check=True)  # what the user is told to run
    model = build_model("r3d10-tiny", 400)
    init_from_pretrained(model, Path(then))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(clips()), source(clips()))


def test_other_files_are_refused_with_their_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"--init: no file at {tmp_path / 'none.pth'}"):
        init_from_pretrained(build_model("r3d10-tiny", 2), tmp_path / "none.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{text} is not a PyTorch checkpoint \\(Unsupported operand"):
        init_from_pretrained(build_model("r3d10-tiny", 2), text)
    torch.save({"epoch": 3}, tmp_path / "epoch.pth")
    with pytest.raises(ValueError, match="is neither a dali-skd checkpoint nor a state dict"):
        init_from_pretrained(build_model("r3d10-tiny", 2), tmp_path / "epoch.pth")


@pytest.mark.slow
def test_own_checkpoint_loads_with_init_and_keeps_its_shortcut(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "run", method="baseline", epochs=1, shortcut="B"))
    best = tmp_path / "run" / "best.pt"
    state = load_checkpoint(best)
    assert state["config"]["shortcut"] == "B"
    assert "model" not in state  # the classifier is held once, as the "model." entries of "method"
    trained = TrainedRun.load(best, "cpu", 2).classifier  # rebuilt with the stored shortcut B
    assert "layer2.0.shortcut.0.weight" in trained.state_dict()
    expected = trained.eval()(clips())

    model = build_model("r3d10-tiny", 2, shortcut="B")
    report = init_from_pretrained(model, best)
    assert report.source == "dali-skd checkpoint" and len(report.loaded) == len(trained.state_dict())
    assert report.input_norm == "paper"  # the run's own
    torch.testing.assert_close(model.eval()(clips()), expected)

    with pytest.raises(ValueError, match="pass --arch r3d10-tiny --shortcut B"):
        init_from_pretrained(build_model("r3d10-tiny", 2), best)


@pytest.mark.slow
def test_a_checkpoint_of_another_version_is_refused_everywhere_naming_both_versions(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "run", method="baseline", epochs=1))
    old = tmp_path / "old.pt"
    torch.save({**load_checkpoint(tmp_path / "run" / "best.pt"), "checkpoint_version": 1}, old)
    refused = f"{old} is a dali-skd checkpoint of version 1, and this code reads version {CHECKPOINT_VERSION}"
    with pytest.raises(ValueError, match=re.escape(refused)):
        TrainedRun.load(old)
    with pytest.raises(ValueError, match=re.escape(refused)):
        init_from_pretrained(build_model("r3d10-tiny", 2), old)
    with pytest.raises(ValueError, match=re.escape(refused)):
        Trainer.from_config(tiny(data, tmp_path / "student", method="kd", teacher=str(old)), init_distributed("cpu"))
    message = invoke("eval", "--data", str(data), "--checkpoint", str(old), "--device", "cpu", expect_error=True).output
    assert refused in message and "Traceback" not in message
    last = tmp_path / "run" / "last.pt"
    old.replace(last)
    with pytest.raises(ValueError, match=re.escape(refused.replace(str(old), str(last)))):
        train(tiny(data, tmp_path / "run", method="baseline", epochs=2, resume=True))


def test_init_and_freeze_through_train(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = kinetics_model("r3d10-tiny", 400, "A", seed=5)
    path = save_2018_file(source, tmp_path / "resnet-10-kinetics.pth")
    train(tiny(data, tmp_path / "run", method="baseline", epochs=1, init=str(path), freeze="layer2"))
    printed = capsys.readouterr().err  # logged, as the run goes
    loaded = len(source.state_dict()) - 2 - sum(k.endswith("num_batches_tracked") for k in source.state_dict())
    assert f"--init {path} (3D-ResNets-PyTorch checkpoint, saved from DataParallel): loaded {loaded} tensors" in printed
    assert "re-initialised 2 (the classifier does not fit this dataset): fc.weight ((400, 128) in the file" in printed
    assert "note: the file's model was trained on --clip.norm kinetics-2018 inputs, this run gives it " in printed

    last = tmp_path / "run" / "last.pt"
    trained = classifier_state(load_checkpoint(last), last)
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    for key, value in source.state_dict().items():
        if key.startswith(frozen):  # weights and BatchNorm statistics as in the file
            assert torch.equal(trained[key], value), key
        elif not key.startswith("fc."):
            assert not torch.equal(trained[key], value), key


@pytest.mark.slow
def test_lr_backbone_scales_the_encoder_lr_only(data: Path, tmp_path: Path) -> None:
    source = kinetics_model("r3d10-tiny", 2, "A", seed=6)
    path = save_2018_file(source, tmp_path / "k400.pth")
    optim = OptimConfig(lr=0.05, lr_backbone=0.0)
    train(tiny(data, tmp_path / "run", method="baseline", epochs=1, init=str(path), optim=optim))
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.0]
    trained = classifier_state(state, last)
    for key, _ in source.named_parameters():
        assert torch.equal(trained[key], source.state_dict()[key]) != key.startswith("fc."), key
    assert not torch.equal(trained["layer1.0.bn1.running_mean"], source.layer1[0].bn1.running_mean)  # not frozen


def test_param_groups_put_the_encoder_apart_and_the_plateau_scales_both() -> None:
    method = build_method("skd-srl", build_model("r3d10-tiny", 3), 3, ObjectiveConfig())
    method.model.freeze("stem")
    optimizer = torch.optim.SGD(param_groups(method, 0.1, 0.01), lr=0.1)
    heads, encoder = ({id(p) for p in g["params"]} for g in optimizer.param_groups)
    named = dict(method.named_parameters())
    assert heads == {id(p) for k, p in named.items() if k.startswith(("model.fc.", "projector.", "predictor."))}
    assert encoder == {id(p) for k, p in named.items() if k.startswith(tuple(f"model.layer{i}." for i in range(1, 5)))}
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=0)
    for _ in range(2):
        scheduler.step(0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.0001])

    assert [g["lr"] for g in param_groups(method, 0.1, 1.0)] == [0.1, 0.1]  # the same two groups, whatever the factor
    method.model.freeze("encoder")
    assert len(param_groups(method, 0.1, 0.5)) == 1  # a linear probe: no encoder group
    with pytest.raises(ConfigError, match=r"--optim\.lr-backbone is -1\.0; it must be at least 0"):
        build_config(TrainConfig, {"optim__lr_backbone": -1.0})


def test_cli_flags_and_their_errors(data: Path, tmp_path: Path) -> None:
    assert typing.get_args(typing.get_type_hints(TrainConfig)["freeze"]) == FREEZE_POINTS
    help_text = invoke("train", "--help").output
    for flag in ("--init", "--shortcut [A|B]", "--freeze [none|stem|layer1|", "--optim.lr-backbone"):
        assert flag in help_text
    path = tmp_path / "r3d50-tiny.pth"
    torch.save({"state_dict": hara_names(build_model("r3d50-tiny", 400).state_dict())}, path)
    result = invoke(
        "train", "--data", str(data), "--arch", "r3d10-tiny", "--init", str(path), "--out", str(tmp_path / "r"),
        "--device", "cpu", expect_error=True,
    )  # fmt: skip
    assert "pass --arch r3d50-tiny --shortcut B" in result.output and "Traceback" not in result.output


def test_a_checkpoint_changed_by_hand_is_refused_naming_it(tmp_path: Path) -> None:
    """A checkpoint is input from anyone: a config value of the wrong type, a model it does not name, weights of
    another shape; each refused with the file's name, none with a traceback."""
    from conftest import write_checkpoint

    from dali_skd.config import TrainConfig

    good = write_checkpoint(tmp_path / "good.pt", TrainConfig(arch="r3d10-tiny"))
    state = load_checkpoint(good)
    cases = {
        "types": ({**state, "config": {**state["config"], "epochs": "5; rm -rf /"}}, "config.epochs is '5; rm -rf /'"),
        "arch": ({**state, "config": {**state["config"], "arch": "r3d18\x00"}}, "unknown model 'r3d18\\x00'"),
        "shape": ({**state, "method": {**state["method"], "model.fc.weight": torch.zeros(3)}}, "size mismatch"),
    }
    for name, (changed, message) in cases.items():
        torch.save(changed, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}.pt")) as e:
            TrainedRun.load(tmp_path / f"{name}.pt")
        assert message in str(e.value), name


def test_init_refuses_a_file_with_non_finite_weights(tmp_path: Path) -> None:
    source = kinetics_model("r3d10-tiny", 400, "A", seed=2)
    with torch.no_grad():
        source.layer2[0].conv1.weight[0, 0, 0, 0, 0] = float("nan")
    path = save_2018_file(source, tmp_path / "diverged.pth")
    model = build_model("r3d10-tiny", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(f"--init: {path} holds non-finite weights (1 of ")) as e:
        init_from_pretrained(model, path)
    assert "e.g. layer2.0.conv1.weight" in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing loaded
