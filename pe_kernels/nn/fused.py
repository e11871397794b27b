"""PackedConvBNReLU2d: PackedConv2d -> BatchNorm2d -> ReLU as one fused module.

Submodules `conv` (a PackedConv2d) and `bn` (an nn.BatchNorm2d), so the state_dict is that of the three
separate modules. On the torch backend (functional.stock_layer): the stock modules' own forwards. Eval: BN folded
into the conv epilogue, one kernel. Train: conv with per-channel statistics,
BN finalize (running statistics updated exactly as BatchNorm2d), one apply + ReLU pass.
When `conv`, `conv.conv` or `bn` has hooks or is not exactly its stock class, the module calls `bn(conv(x))`
instead (nn/_common.py), and pe_kernels.last_dispatch() says why.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional as PF
from ._common import (NoTorchScript, check_batched_4d, global_hook_reason, module_reason, record_module_path,
                      weight_and_bias)
from .packed import PackedConv2d, conv_reason

Tensor = torch.Tensor


def conv_bn_reason(conv_name: str, conv: nn.Module, bn_name: str, bn: nn.Module) -> Optional[str]:
    """None when PF.conv_bn may stand in for calling `conv` then `bn` (an exact nn.Conv2d or PackedConv2d and an
    exact nn.BatchNorm2d, none hooked); else why not. The caller checks global_hook_reason() once."""
    if type(conv) is PackedConv2d and type(bn) is nn.BatchNorm2d and not conv.last:  # the usual case, inline
        inner = conv._modules["conv"]
        if type(inner) is nn.Conv2d and not _hooked(conv) and not _hooked(inner) and not _hooked(bn):
            return None
    return conv_reason(conv_name, conv) or module_reason(bn_name, bn, nn.BatchNorm2d)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


class PackedConvBNReLU2d(NoTorchScript, nn.Module):
    """act(BatchNorm2d(PackedConv2d(x))) with act = ReLU or None."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, alpha: float, num_estimators: int,
                 gamma: int = 1, stride=1, padding=0, dilation=1, groups: int = 1,
                 minimum_channels_per_group: int = 64, bias: bool = False, padding_mode: str = "zeros",
                 first: bool = False, activation: Optional[str] = "relu", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in PF.ACTIVATIONS:
            raise ValueError(f"activation must be one of {PF.ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.conv = PackedConv2d(in_channels, out_channels, kernel_size, alpha, num_estimators, gamma=gamma,
                                 stride=stride, padding=padding, dilation=dilation, groups=groups,
                                 minimum_channels_per_group=minimum_channels_per_group, bias=bias,
                                 padding_mode=padding_mode, first=first, last=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(self.conv.conv.out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)

    def forward_modules(self, x: Tensor) -> Tensor:
        """The module-by-module forward: act(bn(conv(x))), each submodule called (hooks fire)."""
        out = self.bn(self.conv(x))
        return torch.relu(out) if self.activation == "relu" else out

    def forward(self, x: Tensor) -> Tensor:
        check_batched_4d(self, x)
        mods = self._modules  # not self.conv, self.bn: nn.Module.__getattr__ costs ~1 µs on this hot path
        conv, bn = mods["conv"], mods["bn"]
        reason = global_hook_reason() or conv_bn_reason("conv", conv, "bn", bn)
        if reason is not None:
            out = self.forward_modules(x)
            record_module_path(self, reason)
            return out
        c = conv._modules["conv"]
        if PF.stock_layer(x) is not None:  # the torch backend: the stock modules' own ATen calls
            out = PF.stock_conv_bn(x, c, bn)
            return torch.relu(out) if self.activation == "relu" else out
        weight, bias = weight_and_bias(c)
        return PF.conv_bn_fused(x, weight, bias, bn, c.stride, c.padding, c.dilation, c.groups,
                                activation=self.activation, padding_mode=c.padding_mode)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
