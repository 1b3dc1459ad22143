"""Hara et al.'s 3D ResNets: published parameter counts, shapes, shortcuts, init and memory layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dali_skd.models import build_model, list_models
from dali_skd.models.resnet3d import ZeroPadShortcut


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "shortcut", "millions"),
    [("r3d18", "A", 33.2), ("r3d18", "B", 33.4), ("r3d34", "A", 63.5), ("r3d50", "B", 47.0)],
)
def test_parameter_counts_match_hara_et_al(arch: str, shortcut: str, millions: float) -> None:
    model = build_model(arch, 400, shortcut=shortcut)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.01)


def test_default_shortcuts_are_those_of_the_released_models() -> None:
    assert count_parameters(build_model("r3d18", 400)) / 1e6 == pytest.approx(33.2, rel=0.01)
    assert count_parameters(build_model("r3d50", 400)) / 1e6 == pytest.approx(47.0, rel=0.01)


@pytest.mark.parametrize(("arch", "features"), [("r3d18", 512), ("r3d50", 2048), ("r3d10-tiny", 128)])
def test_num_features_and_classifier(arch: str, features: int) -> None:
    model = build_model(arch, 7)
    assert model.num_features == features
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (features, 7)


@pytest.mark.parametrize("arch", ["r3d10-tiny", "r3d50-tiny"])
def test_forward_is_fc_of_forward_features(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    x = torch.randn(2, 3, 16, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features)
    torch.testing.assert_close(model(x), model.fc(features))


def test_width_scales_every_stage() -> None:
    assert build_model("r3d18", 10, width=0.5).num_features == 256
    assert build_model("r3d50-tiny", 10).num_features == 512


def test_unknown_arch_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'r3d19'") as error:
        build_model("r3d19", 10)
    for arch in ("r3d10", "r3d18", "r3d34", "r3d50", "r3d101", "r3d10-tiny", "r3d18-tiny"):
        assert arch in str(error.value)
        assert arch in list_models()


def test_unknown_shortcut_is_an_error() -> None:
    with pytest.raises(ValueError, match="shortcut must be 'A' or 'B'"):
        build_model("r3d10-tiny", 10, shortcut="C")  # type: ignore[arg-type]


def test_shortcut_a_subsamples_pads_zeros_and_passes_gradient() -> None:
    x = torch.randn(2, 4, 4, 6, 6, requires_grad=True)
    out = ZeroPadShortcut(out_planes=8, stride=2)(x)
    assert out.shape == (2, 8, 2, 3, 3)
    torch.testing.assert_close(out[:, :4], x[:, :, ::2, ::2, ::2])
    assert out[:, 4:].abs().sum() == 0
    out.sum().backward()
    assert x.grad is not None and x.grad[:, :, ::2, ::2, ::2].eq(1).all()


def test_init_is_kaiming_fan_out_and_unit_batchnorm() -> None:
    torch.manual_seed(0)
    model = build_model("r3d18", 10)
    conv = model.layer4[1].conv2
    fan_out = conv.out_channels * math.prod(conv.kernel_size)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert m.weight.eq(1).all() and m.bias.eq(0).all()


@pytest.mark.parametrize("arch", ["r3d10-tiny", "r3d50-tiny"])
def test_channels_last_3d_gives_the_same_logits(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    x = torch.randn(2, 3, 16, 64, 64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last_3d)
    actual = model(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("upto", "frozen"),
    [
        ("none", ()),
        ("stem", ("conv1", "bn1")),
        ("layer2", ("conv1", "bn1", "layer1", "layer2")),
        ("encoder", ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
    ],
)
def test_freeze_fixes_the_stages_up_to_the_one_named(upto: str, frozen: tuple[str, ...]) -> None:
    model = build_model("r3d10-tiny", 3)
    model.freeze(upto)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    model.eval().train()  # a later train() (the trainer's, every epoch) keeps the frozen BatchNorms in eval mode
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm3d):
            assert m.training == (name.split(".")[0] not in frozen), name
    assert model.fc.training and model.fc.weight.requires_grad


def test_freeze_none_undoes_a_freeze_and_unknown_stages_are_refused() -> None:
    model = build_model("r3d10-tiny", 3)
    model.freeze("layer3")
    model.freeze("none")
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="cannot freeze up to 'layer5': pass one of none, stem, layer1"):
        model.freeze("layer5")


def test_frozen_batchnorm_statistics_do_not_move_in_training_mode() -> None:
    torch.manual_seed(0)
    model = build_model("r3d10-tiny", 3)
    model.freeze("layer1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()(torch.randn(2, 3, 8, 32, 32))
    after = model.state_dict()
    assert torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert torch.equal(after["layer1.0.bn2.running_var"], before["layer1.0.bn2.running_var"])
    assert not torch.equal(after["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])


def test_encoder_parameters_are_all_but_the_classifier() -> None:
    model = build_model("r3d50-tiny", 3)
    encoder = {id(p) for p in model.encoder_parameters()}
    assert encoder == {id(p) for name, p in model.named_parameters() if not name.startswith("fc.")}
