"""Every method of Table II runs forward and backward on a tiny 3D ResNet; the kd teacher stays frozen and
out of the optimizer and the state dict."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from dali_skd.config import MethodName, ObjectiveConfig
from dali_skd.methods import METHODS, KnowledgeDistillation, Method, build_method
from dali_skd.models import build_model
from dali_skd.step import param_groups

CLASSES = 5
EXPECTED = {
    # name: (views, loader augments, logged terms)
    "baseline": (1, False, {"ce"}),
    "baseline-aug": (1, True, {"ce"}),
    "self-kd": (2, True, {"ce", "kl"}),
    "kd": (1, True, {"ce", "kd"}),
    "skd-srl": (2, True, {"ce", "kl", "sim"}),
}


def make_method(name: str, teacher: nn.Module | None = None) -> Method:
    torch.manual_seed(0)
    if name == "kd" and teacher is None:
        teacher = build_model("r3d18-tiny", CLASSES)
    return build_method(name, build_model("r3d10-tiny", CLASSES), CLASSES, ObjectiveConfig(), teacher)


def random_batch(views: int, n: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.randn(n, 3, 16, 112, 112) for _ in range(views)], torch.randint(0, CLASSES, (n,))


def test_registry_holds_table_ii() -> None:
    assert set(METHODS) == set(EXPECTED)


def test_the_registry_and_the_configs_method_names_agree() -> None:
    """`config.MethodName` lists the names (a config is checked, and --method offered, without importing torch);
    `METHODS` gives each its class, in the same order."""
    assert list(METHODS) == list(typing.get_args(MethodName))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_method_trains_one_step(name: str) -> None:
    views, augment, terms = EXPECTED[name]
    method = make_method(name).train()
    assert (method.num_views, method.augment) == (views, augment)
    clips, labels = random_batch(views)
    out = method(clips, labels)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert set(out.terms) == terms
    assert all(not term.requires_grad and torch.isfinite(term) for term in out.terms.values())
    assert out.logits.shape == (2, CLASSES) and not out.logits.requires_grad
    out.loss.backward()
    assert method.model.conv1.weight.grad is not None and method.model.conv1.weight.grad.abs().sum() > 0
    assert method.model.fc.weight.grad is not None


def test_skd_srl_heads_are_the_papers() -> None:
    method = make_method("skd-srl")
    assert isinstance(method.projector, nn.Linear)
    assert (method.projector.in_features, method.projector.out_features) == (128, 2048)
    kinds = [type(m) for m in method.predictor]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (method.predictor[0].out_features, method.predictor[3].out_features) == (512, 2048)
    clips, labels = random_batch(2)
    method(clips, labels).loss.backward()
    assert method.projector.weight.grad is not None and method.predictor[0].weight.grad is not None


def test_two_view_loss_under_bf16_autocast_is_float32() -> None:
    method = make_method("skd-srl")
    clips, labels = random_batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(clips, labels)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_wrong_number_of_views_is_an_error() -> None:
    clips, labels = random_batch(1)
    with pytest.raises(ValueError, match="needs 2 view"):
        make_method("skd-srl")(clips, labels)


def test_kd_teacher_is_a_frozen_submodule_outside_the_optimizer_and_the_checkpoint() -> None:
    """The teacher is registered (it moves with the method) but takes no gradient, stays in eval mode, and is
    neither trained nor saved: a checkpoint's `trained_state` leaves it out, and loading one keeps it."""
    teacher = build_model("r3d18-tiny", CLASSES)
    method = make_method("kd", teacher)
    assert isinstance(method, KnowledgeDistillation) and method.teacher is teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    groups = param_groups(method, 0.1, 0.5)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for g in groups for p in g["params"]}
    state = method.trained_state()
    assert state and all(key.startswith("model.") for key in state)
    method.train()
    assert method.training and method.model.training and not teacher.training
    clips, labels = random_batch(1)
    method(clips, labels).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    method.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64
    other = make_method("kd", build_model("r3d18-tiny", CLASSES)).to(torch.float64)
    own_teacher = {k: v.clone() for k, v in other.teacher.state_dict().items()}
    other.load_trained_state(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(other.teacher.state_dict()[k], v) for k, v in own_teacher.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_trained_state({k: v for k, v in state.items() if k != "model.fc.weight"})


def test_kd_without_teacher_or_with_other_classes_is_an_error() -> None:
    student = build_model("r3d10-tiny", CLASSES)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method("kd", student, CLASSES, ObjectiveConfig())
    with pytest.raises(ValueError, match="teacher predicts 7 classes, the student 5"):
        build_method("kd", student, CLASSES, ObjectiveConfig(), build_model("r3d10-tiny", 7))


def test_build_method_rejects_bad_arguments() -> None:
    model = build_model("r3d10-tiny", CLASSES)
    with pytest.raises(ValueError, match=r"unknown method 'simsiam'.*skd-srl"):
        build_method("simsiam", model, CLASSES, ObjectiveConfig())
    with pytest.raises(ValueError, match="takes no teacher"):
        build_method("skd-srl", model, CLASSES, ObjectiveConfig(), build_model("r3d10-tiny", CLASSES))
    with pytest.raises(ValueError, match="model predicts 5 classes, the dataset has 6"):
        build_method("baseline", model, 6, ObjectiveConfig())
