"""Fused residual blocks with torch-uncertainty's submodule names (conv1, bn1, ..., dropout, shortcut).

Semantics are those of the unfused blocks::

    Basic:      out = relu(dropout(bn1(conv1 x)));  out = relu(bn2(conv2 out) + shortcut(x))
    Bottleneck: out = relu(bn1(conv1 x)); out = relu(dropout(bn2(conv2 out))); out = relu(bn3(conv3 out) + shortcut(x))

Fused schedule (when every norm is an nn.BatchNorm2d, the activation is ReLU and dropout is inactive):
* training: conv1 with statistics; its BN+ReLU is applied in the prologue of conv2 (and conv2's in conv3's),
  so the normalised tensors never touch memory; the tail bn3-apply + shortcut-BN-apply + add + ReLU is one pass.
* eval: each BN folded into its conv's epilogue; the last conv adds the residual and applies ReLU in its epilogue.
Otherwise the block runs module by module, exactly as torch-uncertainty does.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as PF
from ..ops import bn_apply
from .packed import PackedConv2d

Tensor = torch.Tensor


def conv2d_of(module: nn.Module) -> nn.Conv2d:
    """The nn.Conv2d that holds the weights of a conv module (PackedConv2d wraps one)."""
    conv = module.conv if isinstance(module, PackedConv2d) else module
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d or PackedConv2d, got {type(module).__name__}")
    return conv


def _conv_kwargs(module: nn.Module) -> dict:
    c = conv2d_of(module)
    return dict(weight=c.weight, bias=c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                groups=c.groups, padding_mode=c.padding_mode)


class _FusedResidualBlock(nn.Module):
    """Shared forward of the fused blocks; subclasses define the modules and `_chain()`."""

    dropout: nn.Module
    shortcut: nn.Sequential
    activation_fn = staticmethod(F.relu)

    def _chain(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, norm) pairs in order."""
        raise NotImplementedError

    def _dropout_index(self) -> int:
        """Index in _chain() of the pair whose output the dropout follows."""
        raise NotImplementedError

    def _fusable(self) -> bool:
        norms = [bn for _, bn in self._chain()] + list(self.shortcut)[1:]
        if not all(isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm) for bn in norms):
            return False
        if self.activation_fn is not F.relu and self.activation_fn is not torch.relu:
            return False
        dropout_active = self.training and getattr(self.dropout, "p", 0.0) > 0
        return not dropout_active

    def _forward_unfused(self, x: Tensor) -> Tensor:
        chain = self._chain()
        out = x
        for i, (conv, bn) in enumerate(chain[:-1]):
            out = bn(conv(out))
            if i == self._dropout_index():
                out = self.dropout(out)
            out = self.activation_fn(out)
        conv, bn = chain[-1]
        out = bn(conv(out)) + self.shortcut(x)
        return self.activation_fn(out)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self._forward_unfused(x)
        chain = self._chain()
        h: PF.Activation = x
        for conv, bn in chain[:-1]:
            h = PF.conv_bn(h, bn=bn, activation="relu", defer=True, **_conv_kwargs(conv))
        conv, bn = chain[-1]
        has_shortcut = len(self.shortcut) > 0
        if has_shortcut:
            sc_conv, sc_bn = self.shortcut[0], self.shortcut[1]
        if not bn.training and not (has_shortcut and sc_bn.training):
            residual = PF.conv_bn(x, bn=sc_bn, activation=None, **_conv_kwargs(sc_conv)) if has_shortcut else x
            return PF.conv_bn(h, bn=bn, activation="relu", residual=residual, **_conv_kwargs(conv))
        y, scale, shift = PF.conv_bn_pending(h, bn=bn, **_conv_kwargs(conv))
        if has_shortcut:
            ys, s_scale, s_shift = PF.conv_bn_pending(x, bn=sc_bn, **_conv_kwargs(sc_conv))
            return bn_apply(y, scale, shift, ys, s_scale, s_shift, relu=True)
        return bn_apply(y, scale, shift, residual=x, relu=True)


def _packed_shortcut(in_planes, out_planes, stride, alpha, num_estimators, gamma, groups, conv_bias,
                     normalization_layer) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        PackedConv2d(in_planes, out_planes, kernel_size=1, alpha=alpha, num_estimators=num_estimators, gamma=gamma,
                     groups=groups, stride=stride, bias=conv_bias),
        normalization_layer(out_planes * alpha))


class PackedBasicBlock(_FusedResidualBlock):
    """torch-uncertainty's packed _BasicBlock (same arguments and state_dict), fused."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, alpha: int, num_estimators: int, gamma: int,
                 conv_bias: bool, dropout_rate: float, groups: int,
                 normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = PackedConv2d(in_planes, planes, kernel_size=3, alpha=alpha, num_estimators=num_estimators,
                                  groups=groups, stride=stride, padding=1, bias=conv_bias)
        self.bn1 = normalization_layer(planes * alpha)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv2 = PackedConv2d(planes, planes, kernel_size=3, alpha=alpha, num_estimators=num_estimators,
                                  gamma=gamma, groups=groups, stride=1, padding=1, bias=conv_bias)
        self.bn2 = normalization_layer(planes * alpha)
        self.shortcut = _packed_shortcut(in_planes, self.expansion * planes, stride, alpha, num_estimators, gamma,
                                         groups, conv_bias, normalization_layer)

    def _chain(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def _dropout_index(self) -> int:
        return 0


class PackedBottleneck(_FusedResidualBlock):
    """torch-uncertainty's packed _Bottleneck (same arguments and state_dict), fused."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, alpha: int, num_estimators: int, gamma: int,
                 conv_bias: bool, dropout_rate: float, groups: int,
                 normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = PackedConv2d(in_planes, planes, kernel_size=1, alpha=alpha, num_estimators=num_estimators,
                                  gamma=1, groups=groups, bias=conv_bias)
        self.bn1 = normalization_layer(planes * alpha)
        self.conv2 = PackedConv2d(planes, planes, kernel_size=3, alpha=alpha, num_estimators=num_estimators,
                                  gamma=gamma, stride=stride, padding=1, groups=groups, bias=conv_bias)
        self.bn2 = normalization_layer(planes * alpha)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv3 = PackedConv2d(planes, self.expansion * planes, kernel_size=1, alpha=alpha,
                                  num_estimators=num_estimators, gamma=gamma, groups=groups, bias=conv_bias)
        self.bn3 = normalization_layer(self.expansion * planes * alpha)
        self.shortcut = _packed_shortcut(in_planes, self.expansion * planes, stride, alpha, num_estimators, gamma,
                                         groups, conv_bias, normalization_layer)

    def _chain(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    def _dropout_index(self) -> int:
        return 1


def _shortcut(in_planes, out_planes, stride, groups, conv_bias, normalization_layer) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, groups=groups, bias=conv_bias),
        normalization_layer(out_planes))


class BasicBlock(_FusedResidualBlock):
    """torch-uncertainty's standard _BasicBlock (same arguments and state_dict), fused."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, dropout_rate: float, groups: int, conv_bias: bool,
                 activation_fn: Callable = F.relu, normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.activation_fn = activation_fn
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, groups=groups,
                               bias=conv_bias)
        self.bn1 = normalization_layer(planes)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, groups=groups, bias=conv_bias)
        self.bn2 = normalization_layer(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride, groups, conv_bias, normalization_layer)

    def _chain(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def _dropout_index(self) -> int:
        return 0


class Bottleneck(_FusedResidualBlock):
    """torch-uncertainty's standard _Bottleneck (same arguments and state_dict), fused."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, dropout_rate: float, groups: int, conv_bias: bool,
                 activation_fn: Callable = F.relu, normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.activation_fn = activation_fn
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, groups=groups, bias=conv_bias)
        self.bn1 = normalization_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=groups,
                               bias=conv_bias)
        self.bn2 = normalization_layer(planes)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, groups=groups, bias=conv_bias)
        self.bn3 = normalization_layer(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride, groups, conv_bias, normalization_layer)

    def _chain(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    def _dropout_index(self) -> int:
        return 1
