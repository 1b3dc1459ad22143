"""3D ResNets of Hara et al., "Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?"
(CVPR 2018; code: kenshohara/3D-ResNets-PyTorch, models/resnet.py), the encoders of the SKD-SRL paper.

Stem: conv 7x7x7 stride (1,2,2) -> BN -> ReLU -> 3x3x3 max-pool stride 2; four stages of 64, 128, 256, 512
planes (stride 1, 2, 2, 2); global average pool; linear classifier. The tiny presets of `build_model`
narrow the stages and make the stem 3x7x7 with stride (2,2,2) so that the CPU demo trains in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dali_skd.errors import ConfigError

Shortcut = Literal["A", "B"]  # "A": strided identity + zero channels (no parameters); "B": 1x1x1 conv + BN
ENCODER_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # stem: conv1 + bn1
FREEZE_POINTS = ("none", *ENCODER_STAGES, "encoder")  # `ResNet3d.freeze`; "encoder": all stages, a linear probe


def conv3x3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut option A: subsample with the block's stride, then append zero channels up to `out_planes`.

    Hara et al. concatenate `out.data`, which cuts the gradient through the shortcut; here it flows, as in a
    ResNet's identity shortcut."""

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        x = x[:, :, ::s, ::s, ::s]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.out_planes - x.shape[1]))


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Shortcut option B: 1x1x1 convolution + BN."""
    return nn.Sequential(
        nn.Conv3d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm3d(out_planes)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv3x3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + residual)


@dataclass(frozen=True)
class ResNet3dSpec:
    """Everything that tells one 3D ResNet from another; `build_model` keeps one per name."""

    block: type[BasicBlock | Bottleneck]
    layers: tuple[int, int, int, int]
    shortcut: Shortcut
    width: float = 1.0  # planes per stage = width x (64, 128, 256, 512), Hara's `widen_factor`
    stem_t_kernel: int = 7  # Hara's `conv1_t_size`
    stem_t_stride: int = 1  # Hara's `conv1_t_stride`


class ResNet3d(nn.Module):
    """`forward(x)`: logits for x of shape N x 3 x T x H x W. `forward_features(x)`: the pooled N x
    `num_features` vector before `fc`, so that an objective can run the encoder once and apply `fc` itself.
    The encoder is everything but `fc`; `freeze` fixes its first stages for fine-tuning."""

    def __init__(self, spec: ResNet3dSpec, num_classes: int) -> None:
        super().__init__()
        if spec.shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {spec.shortcut!r}")
        planes = [max(1, round(p * spec.width)) for p in (64, 128, 256, 512)]
        self.spec = spec
        self.frozen: tuple[str, ...] = ()  # encoder stages fixed by `freeze`
        self.in_planes = planes[0]
        self.conv1 = nn.Conv3d(
            3,
            planes[0],
            kernel_size=(spec.stem_t_kernel, 7, 7),
            stride=(spec.stem_t_stride, 2, 2),
            padding=(spec.stem_t_kernel // 2, 3, 3),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(planes[0], spec.layers[0], stride=1)
        self.layer2 = self._make_stage(planes[1], spec.layers[1], stride=2)
        self.layer3 = self._make_stage(planes[2], spec.layers[2], stride=2)
        self.layer4 = self._make_stage(planes[3], spec.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.num_features = planes[3] * spec.block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        block = self.spec.block
        out_planes = planes * block.expansion
        shortcut: nn.Module | None = None
        if stride != 1 or self.in_planes != out_planes:
            if self.spec.shortcut == "A":
                shortcut = ZeroPadShortcut(out_planes, stride)
            else:
                shortcut = projection_shortcut(self.in_planes, out_planes, stride)
        stage = [block(self.in_planes, planes, stride, shortcut)]
        self.in_planes = out_planes
        stage += [block(out_planes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def stages(self) -> dict[str, list[nn.Module]]:
        """The encoder's modules by stage, input first (`ENCODER_STAGES`)."""
        return {
            "stem": [self.conv1, self.bn1],
            "layer1": [self.layer1],
            "layer2": [self.layer2],
            "layer3": [self.layer3],
            "layer4": [self.layer4],
        }

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for modules in self.stages().values() for m in modules for p in m.parameters()]

    def freeze(self, upto: str) -> None:
        """Fixes the encoder up to and including stage `upto` (one of `FREEZE_POINTS`; "none" unfreezes): its
        parameters get no gradient and its BatchNorm layers stay in eval mode through `train()`, so that their
        running statistics remain those of the pretrained weights."""
        if upto not in FREEZE_POINTS:
            raise ConfigError(f"cannot freeze up to {upto!r}: pass one of {', '.join(FREEZE_POINTS)}")
        self.frozen = ENCODER_STAGES[: FREEZE_POINTS.index(upto)]
        for name, modules in self.stages().items():
            for m in modules:
                m.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet3d:
        super().train(mode)
        for name in self.frozen:
            for m in self.stages()[name]:
                m.eval()
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))
