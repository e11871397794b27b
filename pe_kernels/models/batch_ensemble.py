"""BatchEnsemble ResNet (torch-uncertainty's `batched_resnet`), same arguments, structure and state_dict.

forward: x (B, C, H, W) is repeated to (M*B, ...) — in training and in eval alike, as torch-uncertainty does
(its training loop repeats the targets "b -> (m b)") — then a ResNet of BatchConv2d layers (shared weight,
per-estimator r/s/bias) and a BatchLinear head: output (M*B, classes), row m*B + b = estimator m on sample b.

Blocks (submodules conv1, bn1, conv2, bn2, dropout, conv3, bn3, shortcut as in torch-uncertainty):
  Bottleneck: relu(bn1(conv1 x)) -> relu(dropout(bn2(conv2))) -> bn3(conv3) + shortcut(x) -> relu
              (shortcut = BatchConv2d 1x1 + BN when the shape changes)
  Basic:      relu(dropout(bn1(conv1 x))) -> bn2(conv2) + shortcut(x) -> relu   (shortcut = nn.Conv2d + BN)
Fused path: the convs are called as modules (BatchConv2d runs pe_kernels.functional itself) and each
BN (+ residual) + ReLU is one `batch_norm_act` pass instead of calling the norms, the dropout and the shortcut
Sequential. The r/s/bias scaling per (estimator of the sample, channel) is not fused into the conv yet (the
op's prologue/epilogue scales are per channel only): two extra elementwise passes per conv. The fused path
runs only under the rule of pe_kernels.nn's fused modules (nn/_common.py): every bypassed norm exactly an
nn.BatchNorm2d, the dropout exactly an inactive nn.Dropout2d, the shortcut an nn.Sequential, none hooked, no
global module hook. Otherwise — and in `forward_eager`, the stock PyTorch path — the block runs module by
module, and pe_kernels.last_dispatch() says why.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as PF
from ..nn._common import dropout_shortcut_reason, global_hook_reason, module_reason, record_module_path
from ..nn.batch_ensemble import BatchConv2d, BatchLinear
from .resnet import BASIC_ARCHS, NARROW_ARCHS, resnet_num_blocks

Tensor = torch.Tensor


class _BatchBlock(nn.Module):
    """Shared forward of the BatchEnsemble residual blocks; subclasses define the modules, `_names` and
    `_dropout_index`."""

    dropout: nn.Module
    shortcut: nn.Sequential
    _names: tuple[tuple[str, str], ...]  # (conv, norm) attribute names in order
    _dropout_index: int                  # index in _names of the pair whose output the dropout follows

    def _chain(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, norm) pairs in order."""
        mods = self._modules  # not self.conv1: nn.Module.__getattr__ costs ~1 µs a lookup
        return [(mods[conv], mods[bn]) for conv, bn in self._names]

    def module_path_reason(self) -> Optional[str]:
        """Why the fused BN passes cannot stand in for the norms, dropout and shortcut now (None: they can).
        The convs are called as modules on both paths. See pe_kernels/nn/_common.py."""
        reason = global_hook_reason()
        if reason is not None:
            return reason
        mods = self._modules
        for _, bn_name in self._names:
            reason = module_reason(bn_name, mods[bn_name], nn.BatchNorm2d)
            if reason is not None:
                return reason
        reason, parts = dropout_shortcut_reason(mods["dropout"], mods["shortcut"])
        if reason is not None or not parts:
            return reason
        return module_reason("shortcut.1", parts[1], nn.BatchNorm2d)

    def forward_eager(self, x: Tensor) -> Tensor:
        """torch-uncertainty's forward, module by module (every submodule called, so its hooks fire)."""
        chain = self._chain()
        out = x
        for i, (conv, bn) in enumerate(chain[:-1]):
            out = bn(conv(out))
            if i == self._dropout_index:
                out = self.dropout(out)
            out = F.relu(out)
        conv, bn = chain[-1]
        return F.relu(bn(conv(out)) + self.shortcut(x))

    def forward(self, x: Tensor) -> Tensor:
        reason = self.module_path_reason()
        if reason is not None:
            out = self.forward_eager(x)
            record_module_path(self, reason)
            return out
        chain = self._chain()
        out = x
        for conv, bn in chain[:-1]:
            out = PF.batch_norm_act(conv(out), bn, activation="relu")
        shortcut = tuple(self._modules["shortcut"]._modules.values())
        if shortcut:
            residual = PF.batch_norm_act(shortcut[0](x), shortcut[1], activation=None)
        else:
            residual = x
        conv, bn = chain[-1]
        return PF.batch_norm_act(conv(out), bn, activation="relu", residual=residual)


class BatchBasicBlock(_BatchBlock):
    """torch-uncertainty's batched _BasicBlock."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, num_estimators: int, conv_bias: bool,
                 dropout_rate: float, groups: int, normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = BatchConv2d(in_planes, planes, 3, num_estimators, stride=stride, padding=1, groups=groups,
                                 bias=conv_bias)
        self.bn1 = normalization_layer(planes)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv2 = BatchConv2d(planes, planes, 3, num_estimators, stride=1, padding=1, groups=groups,
                                 bias=conv_bias)
        self.bn2 = normalization_layer(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, groups=groups,
                          bias=conv_bias),
                normalization_layer(self.expansion * planes))

    _names = (("conv1", "bn1"), ("conv2", "bn2"))
    _dropout_index = 0


class BatchBottleneck(_BatchBlock):
    """torch-uncertainty's batched _Bottleneck."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, num_estimators: int, conv_bias: bool,
                 dropout_rate: float, groups: int, normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = BatchConv2d(in_planes, planes, 1, num_estimators, groups=groups, bias=conv_bias)
        self.bn1 = normalization_layer(planes)
        self.conv2 = BatchConv2d(planes, planes, 3, num_estimators, stride=stride, padding=1, groups=groups,
                                 bias=conv_bias)
        self.bn2 = normalization_layer(planes)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv3 = BatchConv2d(planes, self.expansion * planes, 1, num_estimators, groups=groups, bias=conv_bias)
        self.bn3 = normalization_layer(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                BatchConv2d(in_planes, self.expansion * planes, 1, num_estimators, stride=stride, groups=groups,
                            bias=conv_bias),
                normalization_layer(self.expansion * planes))

    _names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _dropout_index = 1


class BatchedResNet(nn.Module):
    """torch-uncertainty's _BatchedResNet: repeats the batch M times, BatchConv2d stem (no bias), BatchLinear."""

    def __init__(self, block, num_blocks: list[int], in_channels: int, num_classes: int, num_estimators: int,
                 conv_bias: bool, dropout_rate: float, groups: int = 1,
                 style: Literal["imagenet", "cifar"] = "imagenet", in_planes: int = 64,
                 normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if style not in ("imagenet", "cifar"):
            raise ValueError(f"Unknown style. Got {style}.")
        self.in_planes = in_planes
        self.num_estimators = num_estimators
        self.dropout_rate = dropout_rate
        kernel, stride, padding = (7, 2, 3) if style == "imagenet" else (3, 1, 1)
        self.conv1 = BatchConv2d(in_channels, in_planes, kernel, num_estimators, stride=stride, padding=padding,
                                 groups=groups, bias=False)
        self.bn1 = normalization_layer(in_planes)
        self.optional_pool = nn.MaxPool2d(3, 2, 1) if style == "imagenet" else nn.Identity()

        def stage(planes: int, count: int, first_stride: int) -> nn.Sequential:
            layers = []
            for s in [first_stride] + [1] * (count - 1):
                layers.append(block(self.in_planes, planes, s, num_estimators, conv_bias, dropout_rate, groups,
                                    normalization_layer))
                self.in_planes = planes * block.expansion
            return nn.Sequential(*layers)

        self.layer1 = stage(in_planes, num_blocks[0], 1)
        self.layer2 = stage(in_planes * 2, num_blocks[1], 2)
        self.layer3 = stage(in_planes * 4, num_blocks[2], 2)
        if len(num_blocks) == 4:
            self.layer4 = stage(in_planes * 8, num_blocks[3], 2)
            multiplier = 8
        else:
            self.layer4 = nn.Identity()
            multiplier = 4
        self.final_dropout = nn.Dropout(p=dropout_rate)
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = nn.Flatten(1)
        self.linear = BatchLinear(in_planes * multiplier * block.expansion, num_classes, num_estimators)

    def _stem(self, x: Tensor) -> Tensor:
        """relu(bn1(conv1(x))): conv1 called as a module, bn1 + ReLU one `batch_norm_act` pass when bn1 may be
        bypassed (nn/_common.py), else called."""
        mods = self._modules
        reason = global_hook_reason() or module_reason("bn1", mods["bn1"], nn.BatchNorm2d)
        if reason is not None:
            out = self._stem_eager(x)
            record_module_path(self, reason)
            return out
        return PF.batch_norm_act(mods["conv1"](x), mods["bn1"], activation="relu")

    def _stem_eager(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _body(self, x: Tensor, stem) -> Tensor:
        out = self.optional_pool(stem(x.repeat(self.num_estimators, 1, 1, 1)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.final_dropout(self.flatten(self.pool(out))))

    def forward(self, x: Tensor) -> Tensor:
        return self._body(x, self._stem)

    def forward_eager(self, x: Tensor) -> Tensor:
        """torch-uncertainty's forward with stock modules (submodules decide their own path)."""
        return self._body(x, self._stem_eager)


def batched_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int, conv_bias: bool = True,
                   dropout_rate: float = 0.0, width_multiplier: float = 1.0, groups: int = 1,
                   style: Literal["imagenet", "cifar"] = "imagenet",
                   normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> BatchedResNet:
    """BatchEnsemble ResNet-`arch` (torch-uncertainty's `batched_resnet`; conv_bias defaults to True)."""
    block = BatchBasicBlock if arch in BASIC_ARCHS else BatchBottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return BatchedResNet(block, resnet_num_blocks(arch), in_channels, num_classes, num_estimators, conv_bias,
                         dropout_rate, groups, style, int(in_planes * width_multiplier), normalization_layer)
