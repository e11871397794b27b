"""Drop-in Packed-Ensembles layers, torch-uncertainty >= 0.10 compatible (shared/PEER.md).

PackedConv{1,2,3}d(in, out, k, alpha, num_estimators, gamma=1, ...) hold `self.conv`, an nn.Conv{1,2,3}d with
ext_in = int(in * (1 if first else alpha)) inputs, ext_out = int(out * (M if last else alpha)) outputs and
G = 1 if first else gamma*groups*M groups, gamma reduced while a group would have fewer than
`minimum_channels_per_group` inputs. PackedConv2d runs through pe_kernels.functional (fast paths) unless its
`conv` has hooks or is not exactly an nn.Conv2d (then it calls `conv`: nn/_common.py); 1d/3d run ATen.
Unbatched inputs (C, H, W) work as in nn.Conv2d when last=False. PackedLinear holds `weight`
(G, ext_out/G, ext_in/G) and computes its block-diagonal map the way `implementation` says.
`last=True` moves the estimators from channels to the batch: "b (m c) ... -> (m b) c ...".
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from einops import rearrange
from torch import nn

from .. import functional as PF
from ._common import NoTorchScript, global_hook_reason, module_reason, record_module_path, weight_and_bias

Tensor = torch.Tensor


def check_packed_parameters(alpha: Any, gamma: Any, num_estimators: Any) -> None:
    """The parameter checks of torch-uncertainty, in its order and with its exception types."""
    if alpha is None:
        raise ValueError("You must specify the value of the arg. `alpha`")
    if alpha <= 0:
        raise ValueError(f"Attribute `alpha` should be > 0, not {alpha}")
    if not isinstance(gamma, int):
        raise TypeError(f"Attribute `gamma` should be an int, not {type(gamma)}")
    if gamma <= 0:
        raise ValueError(f"Attribute `gamma` should be >= 1, not {gamma}")
    if num_estimators is None:
        raise ValueError("You must specify the value of the arg. `num_estimators`")
    if not isinstance(num_estimators, int):
        raise TypeError(f"Attribute `num_estimators` should be an int, not {type(num_estimators)}")
    if num_estimators <= 0:
        raise ValueError(f"Attribute `num_estimators` should be >= 1, not {num_estimators}")


def packed_conv_channels(in_channels: int, out_channels: int, alpha: float, num_estimators: int, gamma: int,
                         groups: int, minimum_channels_per_group: int, first: bool, last: bool
                         ) -> tuple[int, int, int]:
    """(ext_in, ext_out, conv groups) of a packed conv, with the gamma reduction of torch-uncertainty."""
    ext_in = int(in_channels * (1 if first else alpha))
    ext_out = int(out_channels * (num_estimators if last else alpha))
    conv_groups = 1 if first else gamma * groups * num_estimators
    while ((ext_in % conv_groups != 0 or ext_in // conv_groups < minimum_channels_per_group)
           and conv_groups // (groups * num_estimators) > 1):
        gamma -= 1
        conv_groups = gamma * groups * num_estimators
    if ext_in % conv_groups != 0:
        raise ValueError(f"The number of extended input channels ({ext_in}) must be divisible by the number of "
                         f"groups ({conv_groups}); in_channels={in_channels}, alpha={alpha}, "
                         f"num_estimators={num_estimators}, gamma={gamma}, groups={groups}")
    if ext_out % (gamma * groups * num_estimators) != 0:
        raise ValueError(f"The number of extended output channels ({ext_out}) must be divisible by "
                         f"gamma*groups*num_estimators ({gamma * groups * num_estimators}); "
                         f"out_channels={out_channels}, alpha={alpha}, num_estimators={num_estimators}")
    return ext_in, ext_out, conv_groups


class _PackedConvNd(NoTorchScript, nn.Module):
    _conv_cls: type[nn.Module] = nn.Conv2d
    _batched_dim = 4  # dimensions of a batched input (N, C, H, W)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, alpha: float, num_estimators: int,
                 gamma: int = 1, stride=1, padding=0, dilation=1, groups: int = 1,
                 minimum_channels_per_group: int = 64, bias: bool = True, padding_mode: str = "zeros",
                 first: bool = False, last: bool = False, device=None, dtype=None) -> None:
        check_packed_parameters(alpha, gamma, num_estimators)
        super().__init__()
        self.first = first
        self.last = last
        self.num_estimators = num_estimators
        ext_in, ext_out, conv_groups = packed_conv_channels(in_channels, out_channels, alpha, num_estimators,
                                                            gamma, groups, minimum_channels_per_group, first, last)
        self.conv = self._conv_cls(ext_in, ext_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                   groups=conv_groups, bias=bias, padding_mode=padding_mode, device=device,
                                   dtype=dtype)

    @property
    def weight(self) -> Tensor:
        """The weight of the underlying convolution."""
        return self.conv.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias of the underlying convolution."""
        return self.conv.bias

    def _check_batched(self, inputs: Tensor) -> bool:
        """True for a batched input; an unbatched one (no N) is refused with last=True."""
        batched = inputs.dim() == self._batched_dim
        if not batched and self.last:
            raise ValueError(f"{type(self).__name__}(last=True) needs a batched input (N, C, ...): it moves the "
                             "estimators from the channels into the batch dimension, which an unbatched input "
                             f"of shape {tuple(inputs.shape)} does not have; add one with inputs.unsqueeze(0)")
        return batched

    def _to_batch(self, out: Tensor) -> Tensor:
        if not self.last:
            return out
        return rearrange(out, "b (m c) ... -> (m b) c ...", m=self.num_estimators)

    def forward(self, inputs: Tensor) -> Tensor:
        self._check_batched(inputs)
        return self._to_batch(self.conv(inputs))


class PackedConv1d(_PackedConvNd):
    """Packed-Ensembles Conv1d (runs ATen's conv1d)."""

    _conv_cls = nn.Conv1d
    _batched_dim = 3


class PackedConv3d(_PackedConvNd):
    """Packed-Ensembles Conv3d (runs ATen's conv3d)."""

    _conv_cls = nn.Conv3d
    _batched_dim = 5


class PackedConv2d(_PackedConvNd):
    """Packed-Ensembles Conv2d: a grouped conv over M·gamma·groups groups, through pe_kernels' ops."""

    _conv_cls = nn.Conv2d

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dim() not in (3, 4):
            raise ValueError(f"PackedConv2d expects a 4-D input (N, C, H, W) or an unbatched 3-D one (C, H, W), "
                             f"got shape {tuple(inputs.shape)}")
        batched = self._check_batched(inputs)
        c = self._modules["conv"]  # not self.conv: nn.Module.__getattr__ costs ~1 µs on this hot path
        reason = global_hook_reason() or module_reason("conv", c, nn.Conv2d)
        if reason is not None:
            out = self._to_batch(c(inputs))
            record_module_path(self, reason)
            return out
        x = inputs if batched else inputs.unsqueeze(0)
        weight, bias = weight_and_bias(c)
        out = PF.packed_conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups, c.padding_mode)
        return self._to_batch(out) if batched else out.squeeze(0)


def conv_reason(name: str, conv: nn.Module) -> Optional[str]:
    """None when a kernel may replace calling `conv`, an exact nn.Conv2d or an exact PackedConv2d (last=False)
    around one, none of them hooked; else why not (nn/_common.py). `name` is its path in the fused module."""
    if type(conv) is PackedConv2d:  # conv._modules: nn.Module.__getattr__ costs ~1 µs on this hot path
        return (module_reason(name, conv, PackedConv2d)
                or module_reason(f"{name}.conv", conv._modules["conv"], nn.Conv2d)
                or (f"{name}.last is True" if conv.last else None))
    return module_reason(name, conv, nn.Conv2d)


class PackedLinear(NoTorchScript, nn.Module):
    """Packed-Ensembles Linear: a block-diagonal map with weight (G, ext_out/G, ext_in/G), G = M*gamma, computed
    as `implementation` says (pe_kernels.functional.packed_linear)."""

    IMPLEMENTATIONS = PF.LINEAR_IMPLEMENTATIONS

    def __init__(self, in_features: int, out_features: int, alpha: float, num_estimators: int, gamma: int = 1,
                 bias: bool = True, first: bool = False, last: bool = False, implementation: str = "einsum",
                 device=None, dtype=None) -> None:
        check_packed_parameters(alpha, gamma, num_estimators)
        if implementation not in self.IMPLEMENTATIONS:
            raise ValueError(f"Unknown implementation: {implementation} for PackedLinear. "
                             f"Available implementations are: {', '.join(map(repr, self.IMPLEMENTATIONS))}")
        super().__init__()
        self.first = first
        self.last = last
        self.num_estimators = num_estimators
        self.implementation = implementation
        ext_in = int(in_features * (1 if first else alpha))
        ext_out = int(out_features * (num_estimators if last else alpha))
        groups = 1 if first else num_estimators * gamma
        if ext_in % groups != 0:
            raise ValueError(f"The number of extended input features ({ext_in}) must be divisible by the number "
                             f"of groups ({groups})")
        if ext_out % (num_estimators * gamma) != 0:
            raise ValueError(f"The number of extended output features ({ext_out}) must be divisible by "
                             f"num_estimators*gamma ({num_estimators * gamma})")
        self.groups = groups
        self.in_features = ext_in // groups
        self.out_features = ext_out // groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((groups, ext_out // groups, ext_in // groups), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(ext_out, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """kaiming_uniform_(a=sqrt(5)) per group slice; bias uniform in +-1/sqrt(fan_in of a group)."""
        for g in range(self.groups):
            nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[2]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, inputs: Tensor) -> Tensor:
        out = PF.packed_linear(inputs, self.weight, self.bias, self.implementation)
        if not self.last:
            return out
        return rearrange(out, "b ... (m h) -> (m b) ... h", m=self.num_estimators)
