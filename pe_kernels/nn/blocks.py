"""Fused residual blocks with torch-uncertainty's submodule names (conv1, bn1, ..., dropout, shortcut).

Semantics are those of the unfused blocks::

    Basic:      out = relu(dropout(bn1(conv1 x)));  out = relu(bn2(conv2 out) + shortcut(x))
    Bottleneck: out = relu(bn1(conv1 x)); out = relu(dropout(bn2(conv2 out))); out = relu(bn3(conv3 out) + shortcut(x))

Fused schedule (when every conv is exactly an nn.Conv2d or PackedConv2d, every norm exactly an nn.BatchNorm2d,
the dropout exactly an inactive nn.Dropout2d, the shortcut an nn.Sequential of a conv and a norm or empty, the
activation ReLU, and no submodule has hooks: nn/_common.py):
* training: conv1 with statistics; its BN+ReLU is applied in the prologue of conv2 (and conv2's in conv3's),
  so the normalised tensors never touch memory; the tail bn3-apply + shortcut-BN-apply + add + ReLU is one pass.
* eval: each BN folded into its conv's epilogue; the last conv adds the residual and applies ReLU in its epilogue.
* a chain of blocks in training (`forward_chain`, run by the models for their stages): a block leaves its tail
  pending (PF.PendingTail) and the next block's first conv -> BN joins it (PF.conv_bn_junction_fused: one autograd
  node, the tail's backward in that conv's dgrad epilogue); the chain's end materializes the last tail.
On the torch backend (PF.stock_layer) the block runs its submodules' stock forwards, as torch-uncertainty does.
Otherwise the block runs module by module, exactly as torch-uncertainty does (`forward_modules`), and
pe_kernels.last_dispatch() says why.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as PF
from ..ops import bn_apply
from ._common import (NoTorchScript, activation_reason, check_batched_4d, dropout_shortcut_reason,
                      global_hook_reason, record_module_path, weight_and_bias)
from .fused import conv_bn_reason
from .packed import PackedConv2d

Tensor = torch.Tensor


def conv2d_of(module: nn.Module) -> nn.Conv2d:
    """The nn.Conv2d that holds the weights of a conv module (PackedConv2d wraps one)."""
    conv = module._modules["conv"] if isinstance(module, PackedConv2d) else module
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d or PackedConv2d, got {type(module).__name__}")
    return conv


def _conv_kwargs(module: nn.Module) -> dict:
    c = conv2d_of(module)
    weight, bias = weight_and_bias(c)
    return dict(weight=weight, bias=bias, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                padding_mode=c.padding_mode)


class _FusedResidualBlock(NoTorchScript, nn.Module):
    """Shared forward of the fused blocks; subclasses define the modules, `_names` and `_dropout_index`."""

    dropout: nn.Module
    shortcut: nn.Sequential
    activation_fn = staticmethod(F.relu)
    _names: tuple[tuple[str, str], ...]  # (conv, norm) attribute names in order
    _dropout_index: int                  # index in _names of the pair whose output the dropout follows

    # Submodules are read from self._modules on the hot path: nn.Module.__getattr__ costs ~1 µs a lookup.
    def _chain(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, norm) pairs in order."""
        mods = self._modules
        return [(mods[conv], mods[bn]) for conv, bn in self._names]

    def module_path_reason(self) -> Optional[str]:
        """Why the fused kernels cannot stand in for the submodules now (None: they can). See nn/_common.py."""
        reason = global_hook_reason()
        if reason is not None:
            return reason
        mods = self._modules
        for conv_name, bn_name in self._names:
            reason = conv_bn_reason(conv_name, mods[conv_name], bn_name, mods[bn_name])
            if reason is not None:
                return reason
        reason = activation_reason(self.activation_fn)
        if reason is None:
            reason, parts = dropout_shortcut_reason(mods["dropout"], mods["shortcut"])
        if reason is not None or not parts:
            return reason
        return conv_bn_reason("shortcut.0", parts[0], "shortcut.1", parts[1])

    def forward_modules(self, x: Tensor) -> Tensor:
        """torch-uncertainty's forward, module by module (every submodule called, so its hooks fire)."""
        chain = self._chain()
        out = x
        for i, (conv, bn) in enumerate(chain[:-1]):
            out = bn(conv(out))
            if i == self._dropout_index:
                out = self.dropout(out)
            out = self.activation_fn(out)
        conv, bn = chain[-1]
        out = bn(conv(out)) + self.shortcut(x)
        return self.activation_fn(out)

    def _forward_stock(self, x: Tensor, chain: list[tuple[nn.Module, nn.Module]]) -> Tensor:
        """forward_modules without the module calls' overhead: the submodules' own forward methods (nn.Conv2d's,
        BatchNorm2d's), valid where module_path_reason() found no hook, no subclass and an inactive dropout."""
        out = x
        for conv, bn in chain[:-1]:
            out = torch.relu(PF.stock_conv_bn(out, conv2d_of(conv), bn))
        conv, bn = chain[-1]
        out = PF.stock_conv_bn(out, conv2d_of(conv), bn)
        parts = tuple(self._modules["shortcut"]._modules.values())
        residual = PF.stock_conv_bn(x, conv2d_of(parts[0]), parts[1]) if parts else x
        return torch.relu(out + residual)

    def chain_reason(self) -> Optional[str]:
        """Why forward_chain must call the module itself (None: it may run its fused chain step): hooks on the
        block, a subclass's own forward, the module path, a BN not training."""
        mods = self._modules
        for _, bn_name in self._names:
            if not mods[bn_name].training:
                return "a BatchNorm in eval"
        parts = tuple(mods["shortcut"]._modules.values())
        if parts and not getattr(parts[-1], "training", False):
            return "a BatchNorm in eval"
        if self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks:
            return "the block has hooks"
        if type(self).forward is not _FusedResidualBlock.forward:
            return "a subclass's forward"
        return self.module_path_reason()  # (exact BatchNorm2d modules in training: batch statistics)

    def forward_chain(self, x: PF.Activation) -> PF.Activation:
        """forward(x) for the blocks of a model's chain in training: x may be the previous block's PF.PendingTail
        (joined to this block's first conv -> BN), and this block's tail may be returned pending (the caller
        materializes the chain's last: PF.materialize). Where chain_reason() or stock_layer() says no, the module
        itself is called on the materialized input."""
        t = x.tensor if isinstance(x, PF.PendingTail) else x
        if self.chain_reason() is not None or PF.stock_layer(t) is not None:
            return self(PF.materialize(x))
        chain = self._chain()
        conv, bn = chain[0]
        if isinstance(x, PF.PendingTail):
            x, h = PF.conv_bn_junction_fused(x, bn=bn, activation="relu", **_conv_kwargs(conv))
        else:
            check_batched_4d(self, x)
            h = PF.conv_bn_fused(x, bn=bn, activation="relu", defer=True, **_conv_kwargs(conv))
        for conv, bn in chain[1:-1]:
            h = PF.conv_bn_fused(h, bn=bn, activation="relu", defer=True, **_conv_kwargs(conv))
        conv, bn = chain[-1]
        kwargs = _conv_kwargs(conv)
        if PF.batch_norm_count(h, **kwargs) < 2:  # BatchNorm2d's errors and empty batches: the block's own tail
            return self._tail(x, h, conv, bn)
        parts = tuple(self._modules["shortcut"]._modules.values())
        if parts:  # the shortcut's conv -> BN goes with the tail (the junction runs both)
            return PF.PendingTail(h, kwargs, bn, None, None, True, (x, _conv_kwargs(parts[0]), parts[1]))
        return PF.PendingTail(h, kwargs, bn, x, None, True)

    def forward(self, x: Tensor) -> Tensor:
        check_batched_4d(self, x)
        reason = self.module_path_reason()
        if reason is not None:
            out = self.forward_modules(x)
            record_module_path(self, reason)
            return out
        chain = self._chain()
        stock = PF.stock_layer(x)
        if stock is not None:  # the torch backend: the stock modules' forwards, one by one (recorded by stock_layer)
            return self._forward_stock(x, chain)
        h: PF.Activation = x
        for conv, bn in chain[:-1]:
            h = PF.conv_bn_fused(h, bn=bn, activation="relu", defer=True, **_conv_kwargs(conv))
        conv, bn = chain[-1]
        return self._tail(x, h, conv, bn)

    def _tail(self, x: Tensor, h: PF.Activation, conv: nn.Module, bn: nn.Module) -> Tensor:
        """The block's output from its input x and h, the last conv's input: last conv -> bn + shortcut -> ReLU."""
        has_shortcut = len(self.shortcut) > 0
        if has_shortcut:
            sc_conv, sc_bn = self.shortcut[0], self.shortcut[1]
        if not bn.training and not (has_shortcut and sc_bn.training):
            residual = PF.conv_bn_fused(x, bn=sc_bn, activation=None, **_conv_kwargs(sc_conv)) if has_shortcut else x
            return PF.conv_bn_fused(h, bn=bn, activation="relu", residual=residual, **_conv_kwargs(conv))
        kwargs = _conv_kwargs(conv)
        if has_shortcut and bn.training and PF.batch_norm_count(h, **kwargs) != 1:
            # Training: the shortcut's (y, scale, shift) enter the last conv's BatchNorm tail as an affine residual;
            # the last conv, its BN, the residual and the ReLU are one autograd node (ops.conv_bn_act).
            ys, s_scale, s_shift = PF.conv_bn_pending(x, bn=sc_bn, **_conv_kwargs(sc_conv))
            return PF.conv_bn_fused(h, bn=bn, activation="relu", residual=ys, residual_affine=(s_scale, s_shift),
                                    **kwargs)
        if has_shortcut:  # the last BN in eval with a training shortcut BN, or BatchNorm2d's one-value error: the
            y, scale, shift = PF.conv_bn_pending(h, bn=bn, **kwargs)  # last BN first, as the stock modules
            ys, s_scale, s_shift = PF.conv_bn_pending(x, bn=sc_bn, **_conv_kwargs(sc_conv))
            return bn_apply(y, scale, shift, ys, s_scale, s_shift, relu=True)
        return PF.conv_bn_fused(h, bn=bn, activation="relu", residual=x, **kwargs)


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

    _names = (("conv1", "bn1"), ("conv2", "bn2"))
    _dropout_index = 0


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

    _names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _dropout_index = 1


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

    _names = (("conv1", "bn1"), ("conv2", "bn2"))
    _dropout_index = 0


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

    _names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _dropout_index = 1
