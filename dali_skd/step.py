"""One training step, the trainer's and the benchmark's (`bench --train.arch` times this very step): the method's
loss under autocast, backward through the grad scaler, the SGD step. `build_train_step` sets up what it needs from
its parts (a method around its model, the optimizer settings, the precision): SGD over `param_groups`, the scaler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dali_skd.config import OptimConfig
from dali_skd.methods import Method, MethodOutput
from dali_skd.runtime import Precision, autocast


@dataclass
class TrainStep:
    method: Method
    net: nn.Module  # `method`, or DistributedDataParallel around it
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    precision: Precision
    channels_last: bool  # the method's weights and the views are channels_last_3d
    device: torch.device

    def __call__(self, views: Sequence[Tensor], labels: Tensor) -> MethodOutput:
        """One optimizer step on a batch; the method's output (loss, its terms, view 1's logits)."""
        if self.channels_last:  # a no-op (no copy) on the loader's views, channels_last_3d already (`channels_last`)
            views = [v.to(memory_format=torch.channels_last_3d) for v in views]
        with autocast(self.precision, self.device):
            output = self.net(views, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(output.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return output


def build_train_step(
    method: Method,
    optim: OptimConfig,
    precision: Precision,
    device: torch.device,
    channels_last: bool = False,
    distributed: bool = False,
) -> TrainStep:
    """`method` (`methods.build_method`) on `device` (channels_last_3d on CUDA with `channels_last`), inside
    DistributedDataParallel when `distributed` (a kd teacher, frozen, is left out of its gradient reduction); SGD
    with `optim`'s lr, `lr_backbone`, momentum and weight decay; a grad scaler, on for fp16."""
    channels_last = channels_last and device.type == "cuda"
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = (
        DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
        if distributed
        else method
    )
    optimizer = torch.optim.SGD(
        param_groups(method, optim.lr, optim.lr_backbone),
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return TrainStep(method, net, optimizer, scaler, precision, channels_last, device)


def param_groups(method: Method, lr: float, lr_backbone: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: `fc` and the method's heads at `lr` (the first group, whose lr the
    metrics show), the encoder at `lr_backbone` x `lr`; the plateau schedule scales both. Frozen parameters are
    left out."""
    trained = [p for p in method.parameters() if p.requires_grad]
    encoder = {id(p) for p in method.model.encoder_parameters()}
    groups = [
        {"params": [p for p in trained if id(p) not in encoder], "lr": lr},
        {"params": [p for p in trained if id(p) in encoder], "lr": lr * lr_backbone},
    ]
    return [g for g in groups if g["params"]]
