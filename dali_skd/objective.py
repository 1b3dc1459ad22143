"""The loss of SKD-SRL (Vu, Phung and Wang, "A Novel Self-Knowledge Distillation Approach with Siamese
Representation Learning for Action Recognition", 2022), one small pure function per equation, and the classic
knowledge distillation loss of the paper's KD baseline (Hinton et al., 2015).

Notation as in the paper: p1, p2 are the logits of two views of one clip; z = g(f(x)) is the projector's
output and v = q(z) the predictor's. Every function computes in float32 (float64 inputs stay float64), so
that softmax, log-softmax, KL and cosine stay finite under torch.autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dali_skd.config import ObjectiveConfig


@dataclass
class Loss:
    total: Tensor  # the scalar to backpropagate
    terms: dict[str, Tensor]  # unweighted terms, detached, for logging by name


def _wide(x: Tensor) -> Tensor:
    """x in float32, or as it is if wider: in half precision softmax, KL and cosine overflow or lose precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def soft_target_kl(target_logits: Tensor, logits: Tensor, tau: float) -> Tensor:
    """KL(softmax(target_logits/tau) || softmax(logits/tau)): summed over classes, averaged over the batch."""
    log_target = F.log_softmax(_wide(target_logits) / tau, dim=1)
    log_prediction = F.log_softmax(_wide(logits) / tau, dim=1)
    return F.kl_div(log_prediction, log_target, reduction="batchmean", log_target=True)


def self_distillation_kl(
    p1: Tensor, p2: Tensor, tau: float, *, detach_target: bool = False, tau_squared: bool = False
) -> Tensor:
    """Eq. 2: L_KL = KL(softmax(p/tau) || softmax(p1/tau)) + KL(softmax(p/tau) || softmax(p2/tau)), p = p1 + p2.

    The paper lets the gradient flow through the soft target p and does not scale by tau^2; `detach_target`
    stops that gradient and `tau_squared` multiplies by tau^2 as Hinton et al. do."""
    p1, p2 = _wide(p1), _wide(p2)
    p = p1 + p2
    if detach_target:
        p = p.detach()
    kl = soft_target_kl(p, p1, tau) + soft_target_kl(p, p2, tau)
    return kl * tau**2 if tau_squared else kl


def negative_cosine(v: Tensor, z: Tensor) -> Tensor:
    """Eq. 3: D(v, z) = -(1/N) sum_i v_i . z_i / (|v_i| |z_i|), with stop-gradient on z."""
    return -F.cosine_similarity(_wide(v), _wide(z.detach()), dim=1).mean()


def siamese_loss(v1: Tensor, v2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Eq. 4: L_sim = 1/2 D(v1, stopgrad(z2)) + 1/2 D(v2, stopgrad(z1)), SimSiam's symmetric loss."""
    return 0.5 * negative_cosine(v1, z2) + 0.5 * negative_cosine(v2, z1)


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Loss:
    """CE(p, y), batch-averaged: the supervised term of Eq. 5 and the whole loss of the baselines."""
    ce = F.cross_entropy(_wide(logits), labels)
    return Loss(ce, {"ce": ce.detach()})


def self_kd_loss(p1: Tensor, p2: Tensor, labels: Tensor, cfg: ObjectiveConfig) -> Loss:
    """Eq. 5 without its Siamese term: CE(p1, y) + CE(p2, y) + alpha L_KL (the self-kd baseline).

    The logged `ce` is the mean of the two views' CE, comparable with the one-view methods' `ce`."""
    ce1 = F.cross_entropy(_wide(p1), labels)
    ce2 = F.cross_entropy(_wide(p2), labels)
    kl = self_distillation_kl(p1, p2, cfg.tau, detach_target=cfg.kl_detach_target, tau_squared=cfg.kl_tau_squared)
    total = ce1 + ce2 + cfg.alpha * kl
    return Loss(total, {"ce": (0.5 * (ce1 + ce2)).detach(), "kl": kl.detach()})


def skd_srl_loss(
    p1: Tensor, p2: Tensor, labels: Tensor, v1: Tensor, v2: Tensor, z1: Tensor, z2: Tensor, cfg: ObjectiveConfig
) -> Loss:
    """Eq. 5: L = CE(p1, y) + CE(p2, y) + alpha L_KL (Eq. 2) + beta L_sim (Eq. 4)."""
    self_kd = self_kd_loss(p1, p2, labels, cfg)
    sim = siamese_loss(v1, v2, z1, z2)
    return Loss(self_kd.total + cfg.beta * sim, {**self_kd.terms, "sim": sim.detach()})


def hinton_kd_loss(student: Tensor, teacher: Tensor, labels: Tensor, tau: float, alpha: float) -> Loss:
    """The KD baseline (Hinton et al.): (1 - alpha) CE(student, y) + alpha tau^2 KL(softmax(teacher/tau) ||
    softmax(student/tau)). tau^2 keeps the soft term's gradient on the scale of the CE's as tau changes."""
    ce = F.cross_entropy(_wide(student), labels)
    kd = soft_target_kl(teacher.detach(), student, tau)
    total = (1 - alpha) * ce + alpha * tau**2 * kd
    return Loss(total, {"ce": ce.detach(), "kd": kd.detach()})
