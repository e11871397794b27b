"""PackedConvBNReLU2d: PackedConv2d -> BatchNorm2d -> ReLU as one fused module.

Submodules `conv` (a PackedConv2d) and `bn` (an nn.BatchNorm2d), so the state_dict is that of the three
separate modules. Eval: BN folded into the conv epilogue, one kernel. Train: conv with per-channel statistics,
BN finalize (running statistics updated exactly as BatchNorm2d), one apply + ReLU pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional as PF
from .packed import PackedConv2d

Tensor = torch.Tensor


class PackedConvBNReLU2d(nn.Module):
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

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"PackedConvBNReLU2d expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        c = self.conv.conv
        return PF.conv_bn(x, c.weight, c.bias, self.bn, c.stride, c.padding, c.dilation, c.groups,
                          activation=self.activation, padding_mode=c.padding_mode)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
