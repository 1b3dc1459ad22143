"""Each equation of dali_skd.objective against the same formula written out in numpy on 2x3 logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_skd.config import ObjectiveConfig
from dali_skd.objective import (
    cross_entropy_loss,
    hinton_kd_loss,
    negative_cosine,
    self_distillation_kl,
    self_kd_loss,
    siamese_loss,
    skd_srl_loss,
)

P1 = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
P2 = np.array([[1.0, 0.0, -1.5], [-1.0, 2.0, 4.0]])
LABELS = np.array([0, 2])
V1 = np.array([[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 1.0, 2.0]])
V2 = np.array([[0.0, 1.0, 1.0, 1.0], [-2.0, 0.5, 0.0, 1.0]])
Z1 = np.array([[1.0, 1.0, 1.0, 0.0], [3.0, -1.0, 0.0, 0.5]])
Z2 = np.array([[2.0, -1.0, 0.5, 1.0], [0.0, 1.0, -1.0, 1.0]])


def t(a: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl_by_hand(target: np.ndarray, logits: np.ndarray, tau: float) -> float:
    p, q = softmax(target / tau), softmax(logits / tau)
    return float((p * np.log(p / q)).sum(axis=1).mean())


def eq2_by_hand(p1: np.ndarray, p2: np.ndarray, tau: float) -> float:
    return kl_by_hand(p1 + p2, p1, tau) + kl_by_hand(p1 + p2, p2, tau)


def ce_by_hand(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(softmax(logits)[np.arange(len(labels)), labels]).mean())


def d_by_hand(v: np.ndarray, z: np.ndarray) -> float:
    cos = (v * z).sum(axis=1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(z, axis=1))
    return float(-cos.mean())


@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_eq2_matches_formula(tau: float) -> None:
    expected = eq2_by_hand(P1, P2, tau)
    assert self_distillation_kl(t(P1), t(P2), tau).item() == pytest.approx(expected, rel=1e-10)
    scaled = self_distillation_kl(t(P1), t(P2), tau, tau_squared=True).item()
    assert scaled == pytest.approx(tau**2 * expected, rel=1e-10)


def test_eq3_eq4_match_formula() -> None:
    assert negative_cosine(t(V1), t(Z2)).item() == pytest.approx(d_by_hand(V1, Z2), rel=1e-12)
    expected = 0.5 * d_by_hand(V1, Z2) + 0.5 * d_by_hand(V2, Z1)
    assert siamese_loss(t(V1), t(V2), t(Z1), t(Z2)).item() == pytest.approx(expected, rel=1e-12)


def test_eq5_total_and_terms_match_formula() -> None:
    cfg = ObjectiveConfig(tau=10.0, alpha=0.1, beta=1.0)
    labels = torch.tensor(LABELS)
    loss = skd_srl_loss(t(P1), t(P2), labels, t(V1), t(V2), t(Z1), t(Z2), cfg)
    ce1, ce2 = ce_by_hand(P1, LABELS), ce_by_hand(P2, LABELS)
    kl = eq2_by_hand(P1, P2, 10.0)
    sim = 0.5 * d_by_hand(V1, Z2) + 0.5 * d_by_hand(V2, Z1)
    assert loss.total.item() == pytest.approx(ce1 + ce2 + 0.1 * kl + 1.0 * sim, rel=1e-10)
    assert loss.terms["ce"].item() == pytest.approx((ce1 + ce2) / 2, rel=1e-10)
    assert loss.terms["kl"].item() == pytest.approx(kl, rel=1e-10)
    assert loss.terms["sim"].item() == pytest.approx(sim, rel=1e-10)
    assert all(not term.requires_grad for term in loss.terms.values())

    scaled = self_kd_loss(t(P1), t(P2), labels, ObjectiveConfig(tau=4.0, alpha=0.5, kl_tau_squared=True))
    assert scaled.total.item() == pytest.approx(ce1 + ce2 + 0.5 * 16 * eq2_by_hand(P1, P2, 4.0), rel=1e-10)


def test_cross_entropy_and_hinton_kd_match_formula() -> None:
    labels = torch.tensor(LABELS)
    assert cross_entropy_loss(t(P1), labels).total.item() == pytest.approx(ce_by_hand(P1, LABELS), rel=1e-12)
    loss = hinton_kd_loss(t(P1), t(P2), labels, tau=4.0, alpha=0.9)
    expected = 0.1 * ce_by_hand(P1, LABELS) + 0.9 * 16 * kl_by_hand(P2, P1, 4.0)
    assert loss.total.item() == pytest.approx(expected, rel=1e-10)
    assert loss.terms["kd"].item() == pytest.approx(kl_by_hand(P2, P1, 4.0), rel=1e-10)


def test_no_gradient_reaches_z_through_the_stop_gradient() -> None:
    v1, v2, z1, z2 = (t(a, requires_grad=True) for a in (V1, V2, Z1, Z2))
    siamese_loss(v1, v2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert v1.grad is not None and v1.grad.abs().sum() > 0
    assert v2.grad is not None and v2.grad.abs().sum() > 0


def numeric_gradient_eq2(p1: np.ndarray, p2: np.ndarray, tau: float, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(p1)
    for index in np.ndindex(p1.shape):
        step = np.zeros_like(p1)
        step[index] = eps
        grad[index] = (eq2_by_hand(p1 + step, p2, tau) - eq2_by_hand(p1 - step, p2, tau)) / (2 * eps)
    return grad


@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_detach_target_removes_exactly_the_gradient_through_the_target(tau: float) -> None:
    p1 = t(P1, requires_grad=True)
    self_distillation_kl(p1, t(P2), tau).backward()
    # Default (the paper): the full derivative of Eq. 2, target included.
    np.testing.assert_allclose(p1.grad.numpy(), numeric_gradient_eq2(P1, P2, tau), rtol=1e-6, atol=1e-9)

    p1_detached = t(P1, requires_grad=True)
    self_distillation_kl(p1_detached, t(P2), tau, detach_target=True).backward()
    # With the target held constant only KL(target || softmax(p1/tau)) depends on p1: (q1 - target) / (tau N).
    analytic = (softmax(P1 / tau) - softmax((P1 + P2) / tau)) / (tau * len(P1))
    np.testing.assert_allclose(p1_detached.grad.numpy(), analytic, rtol=1e-10, atol=1e-14)
    assert not np.allclose(p1.grad.numpy(), analytic)


def test_losses_are_float32_and_finite_for_half_precision_logits() -> None:
    # fp16 logits whose sum p1 + p2 (Eq. 2's target) would overflow fp16's range of 65504
    big = torch.tensor([[40000.0, -40000.0, 0.0], [0.0, 30000.0, 35000.0]], dtype=torch.float16)
    cfg = ObjectiveConfig()
    vz = [torch.randn(2, 8, dtype=torch.float16) * 300 for _ in range(4)]
    loss = skd_srl_loss(big, big.flip(1), torch.tensor(LABELS), *vz, cfg)
    assert loss.total.dtype == torch.float32
    assert torch.isfinite(loss.total)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p1 = torch.nn.functional.linear(t(P1).float(), torch.eye(3))
        kd = hinton_kd_loss(p1, t(P2).float(), torch.tensor(LABELS), tau=4.0, alpha=0.9)
    assert kd.total.dtype == torch.float32
    expected = 0.1 * ce_by_hand(P1, LABELS) + 0.9 * 16 * kl_by_hand(P2, P1, 4.0)
    assert kd.total.item() == pytest.approx(expected, rel=2e-2)
