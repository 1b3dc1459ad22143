"""Encoders by name: `build_model("r3d18", num_classes)`; `list_models()` gives the names.

The paper's encoders are Hara et al.'s 3D ResNets at full width. A `-tiny` preset is for tests and the CPU
demo: a quarter of the width (16, 32, 64, 128 planes) and a 3x7x7 stem with stride (2,2,2) instead of 7x7x7
with stride (1,2,2), which makes r3d10-tiny about 3x faster to train on 2 CPU cores (docs/objective.md).
"""

from __future__ import annotations

from dataclasses import replace

from dali_skd.errors import ConfigError
from dali_skd.models.resnet3d import (
    ENCODER_STAGES,
    FREEZE_POINTS,
    BasicBlock,
    Bottleneck,
    ResNet3d,
    ResNet3dSpec,
    Shortcut,
)

TINY = {"width": 0.25, "stem_t_kernel": 3, "stem_t_stride": 2}

# Shortcuts as in Hara et al.'s released Kinetics models: A for basic blocks, B for bottlenecks.
MODELS: dict[str, ResNet3dSpec] = {
    "r3d10": ResNet3dSpec(BasicBlock, (1, 1, 1, 1), "A"),
    "r3d18": ResNet3dSpec(BasicBlock, (2, 2, 2, 2), "A"),
    "r3d34": ResNet3dSpec(BasicBlock, (3, 4, 6, 3), "A"),
    "r3d50": ResNet3dSpec(Bottleneck, (3, 4, 6, 3), "B"),
    "r3d101": ResNet3dSpec(Bottleneck, (3, 4, 23, 3), "B"),
    "r3d10-tiny": ResNet3dSpec(BasicBlock, (1, 1, 1, 1), "A", **TINY),
    "r3d18-tiny": ResNet3dSpec(BasicBlock, (2, 2, 2, 2), "A", **TINY),
    "r3d50-tiny": ResNet3dSpec(Bottleneck, (3, 4, 6, 3), "B", **TINY),
}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(
    arch: str, num_classes: int, *, shortcut: Shortcut | None = None, width: float | None = None
) -> ResNet3d:
    """A freshly initialised `arch` with a `num_classes`-way classifier; `shortcut` ("A" or "B") and `width`
    (a factor on the planes of every stage) override the preset's."""
    if arch not in MODELS:
        raise ConfigError(f"unknown model {arch!r}; known: {', '.join(MODELS)}")
    spec = MODELS[arch]
    if shortcut is not None:
        spec = replace(spec, shortcut=shortcut)
    if width is not None:
        spec = replace(spec, width=width)
    return ResNet3d(spec, num_classes)


__all__ = [
    "ENCODER_STAGES",
    "FREEZE_POINTS",
    "MODELS",
    "ResNet3d",
    "ResNet3dSpec",
    "Shortcut",
    "build_model",
    "list_models",
]
