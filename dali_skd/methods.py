"""The paper's Table II as one interface: every training objective is a `Method`, built by name.

| name           | views | loader augments | loss                                           |
| -------------- | ----- | --------------- | ---------------------------------------------- |
| `baseline`     | 1     | no (crop only)  | CE                                             |
| `baseline-aug` | 1     | yes             | CE                                             |
| `self-kd`      | 2     | yes             | CE + CE + alpha L_KL (Eq. 5 without L_sim)     |
| `kd`           | 1     | yes             | (1 - a) CE + a tau^2 KL(teacher || student)    |
| `skd-srl`      | 2     | yes             | Eq. 5: CE + CE + alpha L_KL + beta L_sim       |

A method holds `model` (encoder + `fc`: what evaluation uses, the "model." entries of a checkpoint's "method")
and its own heads. `step.build_train_step` trains the parameters that take gradients; a checkpoint keeps
`method.trained_state()`. The kd teacher is a frozen submodule (no gradients, always in eval mode) that comes from
`--teacher`: it is in neither. `METHODS` is the one registry of the methods, by the names `config.MethodName` lists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from dali_skd.config import MethodName, ObjectiveConfig
from dali_skd.errors import ConfigError, InputError
from dali_skd.models import ResNet3d
from dali_skd.objective import Loss, cross_entropy_loss, hinton_kd_loss, self_kd_loss, skd_srl_loss


@dataclass
class MethodOutput:
    loss: Tensor  # scalar to backpropagate
    terms: dict[str, Tensor]  # detached unweighted terms by name: ce, kl, sim, kd
    logits: Tensor  # view 1's logits, detached, for the training accuracy

    @classmethod
    def of(cls, loss: Loss, logits: Tensor) -> MethodOutput:
        return cls(loss.total, loss.terms, logits.detach())


class Method(nn.Module, ABC):
    """A training objective around a classifier. The loader delivers `num_views` clips per sample and applies
    the colour, blur and flip augmentations when `augment` is true (else only the random crop)."""

    num_views: ClassVar[int] = 1
    augment: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    given: ClassVar[tuple[str, ...]] = ()  # frozen submodules it is given, not trained: left out of a checkpoint
    loss: ClassVar[str] = "CE"  # its loss in words (the table above; a model card says it)
    settings: ClassVar[tuple[str, ...]] = ()  # the `ObjectiveConfig` fields its loss reads (a model card lists them)

    def __init__(self, model: ResNet3d, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def trained_state(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of the method: its state dict but the submodules it was given."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] not in self.given}

    def load_trained_state(self, state: Mapping[str, Tensor]) -> None:
        """Loads a `trained_state()`, every tensor of it (the given submodules keep their own)."""
        given = {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in self.given}
        self.load_state_dict({**state, **given})

    def encode(self, views: Sequence[Tensor]) -> Tensor:
        """Pooled features of all views, view 1's samples first. The encoder runs once over the views
        concatenated along the batch, so the BN statistics of a step cover both views."""
        if len(views) != self.num_views:
            raise ValueError(
                f"{type(self).__name__} needs {self.num_views} view(s) per sample, got {len(views)}: "
                f"build the loader with num_views={self.num_views}"
            )
        clips = views[0] if len(views) == 1 else torch.cat(list(views))
        return self.model.forward_features(clips)

    @abstractmethod
    def forward(self, views: Sequence[Tensor], labels: Tensor) -> MethodOutput:
        """The loss of one batch: `views` holds `num_views` tensors of N x 3 x T x H x W, `labels` N ints."""


class CrossEntropy(Method):
    """`baseline`: CE on one view that was only randomly cropped."""

    augment = False

    def forward(self, views: Sequence[Tensor], labels: Tensor) -> MethodOutput:
        logits = self.model.fc(self.encode(views))
        return MethodOutput.of(cross_entropy_loss(logits, labels), logits)


class AugmentedCrossEntropy(CrossEntropy):
    """`baseline-aug`: CE on one view with the paper's full augmentation set."""

    augment = True


class SelfKD(Method):
    """`self-kd`: two views, CE + CE + alpha L_KL; no Siamese term."""

    num_views = 2
    loss = "CE + CE + alpha L_KL (Eq. 5 without L_sim)"
    settings = ("tau", "alpha", "kl_detach_target", "kl_tau_squared")

    def forward(self, views: Sequence[Tensor], labels: Tensor) -> MethodOutput:
        p1, p2 = self.model.fc(self.encode(views)).chunk(2)
        return MethodOutput.of(self_kd_loss(p1, p2, labels, self.cfg), p1)


class SKDSRL(Method):
    """`skd-srl`: two views, Eq. 5. Projector g: one linear layer, `proj_dim` wide. Predictor q: Linear,
    BN, ReLU, Linear back to `proj_dim`, nothing after its output (SimSiam's predictor)."""

    num_views = 2
    loss = "Eq. 5: CE + CE + alpha L_KL + beta L_sim (self-knowledge distillation with Siamese representation learning)"
    settings = ("tau", "alpha", "beta", "kl_detach_target", "kl_tau_squared", "proj_dim", "pred_hidden")

    def __init__(self, model: ResNet3d, cfg: ObjectiveConfig) -> None:
        super().__init__(model, cfg)
        self.projector = nn.Linear(model.num_features, cfg.proj_dim)
        self.predictor = nn.Sequential(
            nn.Linear(cfg.proj_dim, cfg.pred_hidden),
            nn.BatchNorm1d(cfg.pred_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.pred_hidden, cfg.proj_dim),
        )

    def forward(self, views: Sequence[Tensor], labels: Tensor) -> MethodOutput:
        features = self.encode(views)
        p1, p2 = self.model.fc(features).chunk(2)
        z = self.projector(features)
        z1, z2 = z.chunk(2)
        v1, v2 = self.predictor(z).chunk(2)
        return MethodOutput.of(skd_srl_loss(p1, p2, labels, v1, v2, z1, z2, self.cfg), p1)


class KnowledgeDistillation(Method):
    """`kd`: one augmented view; a frozen teacher in eval mode gives soft targets (Hinton et al.), with
    `cfg.kd_tau` and `cfg.kd_alpha`."""

    needs_teacher = True
    given = ("teacher",)
    loss = "(1 - a) CE + a tau^2 KL(teacher || student) (Hinton et al.)"
    settings = ("kd_tau", "kd_alpha")

    def __init__(self, model: ResNet3d, cfg: ObjectiveConfig, teacher: nn.Module | None) -> None:
        super().__init__(model, cfg)
        if teacher is None:
            raise ConfigError("method 'kd' needs a teacher: pass --teacher with the checkpoint of a trained model")
        teacher_fc = getattr(teacher, "fc", None)
        if not isinstance(teacher_fc, nn.Linear):
            raise ValueError(f"kd teacher {type(teacher).__name__} has no `fc` classifier: build it with build_model")
        if teacher_fc.out_features != model.fc.out_features:
            raise InputError(
                f"kd teacher predicts {teacher_fc.out_features} classes, the student {model.fc.out_features}: "
                "use a teacher trained on the same dataset"
            )
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> KnowledgeDistillation:
        super().train(mode)
        self.teacher.eval()  # frozen: its BatchNorm layers keep the statistics it was trained with
        return self

    def forward(self, views: Sequence[Tensor], labels: Tensor) -> MethodOutput:
        logits = self.model.fc(self.encode(views))
        with torch.no_grad():
            teacher_logits = self.teacher(views[0])
        loss = hinton_kd_loss(logits, teacher_logits, labels, self.cfg.kd_tau, self.cfg.kd_alpha)
        return MethodOutput.of(loss, logits)


METHODS: dict[MethodName, type[Method]] = {  # in `config.MethodName`'s order
    "baseline": CrossEntropy,
    "baseline-aug": AugmentedCrossEntropy,
    "self-kd": SelfKD,
    "kd": KnowledgeDistillation,
    "skd-srl": SKDSRL,
}


def method_class(name: str) -> type[Method]:
    """The method registered as `name`."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(
    name: str, model: ResNet3d, num_classes: int, cfg: ObjectiveConfig, teacher: nn.Module | None = None
) -> Method:
    """The training objective `name` around `model`; only `kd` takes (and requires) a `teacher`."""
    method = method_class(name)
    if model.fc.out_features != num_classes:
        raise InputError(f"model predicts {model.fc.out_features} classes, the dataset has {num_classes}")
    if method.needs_teacher:
        return method(model, cfg, teacher)  # type: ignore[call-arg]
    if teacher is not None:
        raise ConfigError(f"method {name!r} takes no teacher; only 'kd' does")
    return method(model, cfg)
