"""MIMO ResNet (torch-uncertainty's `mimo_resnet`): a standard ResNet with M-fold inputs and outputs.

    train: x (M*B, C, H, W), per-estimator shuffled copies of the batch (`mimo_batch_format`)
    eval:  x (B, C, H, W) is first repeated to (M*B, ...)
    then   "(m b) c h w -> b (m c) h w" -> ResNet(in_channels*M -> num_classes*M) -> "b (m d) -> (m b) d"

Output (M*B, classes), row m*B + b = estimator m on sample b. The ResNet is pe_kernels' fused ResNet.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..nn import BasicBlock, Bottleneck
from .resnet import BASIC_ARCHS, NARROW_ARCHS, ResNet, resnet_num_blocks

Tensor = torch.Tensor


class MIMOResNet(ResNet):
    """torch-uncertainty's _MIMOResNet (same state_dict as a ResNet with in_channels*M, num_classes*M)."""

    def __init__(self, block, num_blocks: list[int], in_channels: int, num_classes: int, num_estimators: int,
                 conv_bias: bool, dropout_rate: float, groups: int = 1,
                 style: Literal["imagenet", "cifar"] = "imagenet", in_planes: int = 64,
                 activation_fn: Callable = F.relu, normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        if not isinstance(num_estimators, int) or num_estimators < 1:
            raise ValueError(f"num_estimators must be a positive int, got {num_estimators!r}")
        super().__init__(block, num_blocks, in_channels * num_estimators, num_classes * num_estimators, conv_bias,
                         dropout_rate, groups, style, in_planes, activation_fn, normalization_layer)
        self.num_estimators = num_estimators

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_estimators
        if not self.training:
            x = x.repeat(m, 1, 1, 1)
        elif x.shape[0] % m != 0:
            raise ValueError(f"MIMO training expects the batch as num_estimators*B = {m}*B samples "
                             f"(see mimo_batch_format), got {x.shape[0]}")
        out = rearrange(x, "(m b) c h w -> b (m c) h w", m=m)
        out = super().forward(out)
        return rearrange(out, "b (m d) -> (m b) d", m=m)


def mimo_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int, conv_bias: bool = True,
                dropout_rate: float = 0.0, width_multiplier: float = 1.0, groups: int = 1,
                style: Literal["imagenet", "cifar"] = "imagenet",
                normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> MIMOResNet:
    """MIMO ResNet-`arch` (torch-uncertainty's `mimo_resnet`; note conv_bias defaults to True there too)."""
    block = BasicBlock if arch in BASIC_ARCHS else Bottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return MIMOResNet(block, resnet_num_blocks(arch), in_channels, num_classes, num_estimators, conv_bias,
                      dropout_rate, groups, style, int(in_planes * width_multiplier),
                      normalization_layer=normalization_layer)


def mimo_batch_format(inputs: Tensor, targets: Tensor, num_estimators: int, rho: float = 0.0,
                      batch_repeat: int = 1) -> tuple[Tensor, Tensor]:
    """MIMO training batch (torch-uncertainty's MIMOBatchFormat): M shuffled copies -> (M*B*repeat, ...).

    A fraction rho of the (repeated) batch keeps one shared order across estimators; the rest is shuffled
    independently per estimator.
    """
    if num_estimators <= 0:
        raise ValueError("num_estimators must be greater than 0.")
    if not 0.0 <= rho <= 1.0:
        raise ValueError("rho must be between 0 and 1.")
    if batch_repeat <= 0:
        raise ValueError("batch_repeat must be greater than 0.")
    device = inputs.device
    indexes = torch.arange(inputs.shape[0], device=device).repeat(batch_repeat)
    main = indexes[torch.randperm(indexes.numel(), device=device)]
    threshold = int(main.numel() * (1.0 - rho))
    orders = []
    for _ in range(num_estimators):
        head = main[:threshold]
        orders.append(torch.cat([head[torch.randperm(head.numel(), device=device)], main[threshold:]]))
    index = torch.cat(orders)
    return inputs.index_select(0, index), targets.index_select(0, index)
