"""BatchEnsemble layers, torch-uncertainty compatible (same arguments, parameter names, init and forward).

    y = conv(x * r[e(n)], W) * s[e(n)] + bias[e(n)]        BatchConv2d, shared W, per-estimator r, s, bias
    y = (x * r[e(n)]) W^T * s[e(n)] + bias[e(n)]           BatchLinear

e(n) is the estimator of sample n: with b = B // M and extra = B % M, samples 0..M*b-1 use estimator n // b
("m h -> (m b) h"), and the `extra` remaining samples reuse the first `extra` rows of that expansion, i.e.
estimator j // b for sample M*b + j (estimator 0 whenever b >= extra) — torch-uncertainty's exact behaviour.

Parameters: `conv.weight` (or `linear.weight`) shared, no conv bias; `r_group` (M, in) and `s_group` (M, out)
initialised N(1, 0.5); `bias` (M, out) uniform in +-1/sqrt(fan_in).

The convolution runs through pe_kernels.functional (the pe_kernels backends). The per-(sample, channel) r/s
scales and bias are NOT fused yet: the op's prologue/epilogue scales are per channel, not per (estimator of the
sample, channel), so they are separate elementwise passes around the conv. `forward_eager` is the stock PyTorch
path (nn.Conv2d), used by the benchmark's eager twin, and by forward when `conv` has hooks (prune, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .. import functional as PF
from ._common import NoTorchScript, global_hook_reason, module_reason, record_module_path

Tensor = torch.Tensor


def per_sample(group: Tensor, batch_size: int) -> Tensor:
    """Rows of `group` (M, C) for each of `batch_size` samples: (B, C), torch-uncertainty's estimator layout."""
    num_estimators = group.shape[0]
    per_estimator, extra = divmod(batch_size, num_estimators)
    if per_estimator == 0:
        raise ValueError(f"a BatchEnsemble layer with num_estimators={num_estimators} needs a batch of at least "
                         f"{num_estimators} samples (the batch is split between the estimators), got {batch_size}")
    rows = group.repeat_interleave(per_estimator, dim=0)
    return torch.cat([rows, rows[:extra]], dim=0) if extra else rows


def _check_estimators(num_estimators) -> None:
    if not isinstance(num_estimators, int) or num_estimators < 1:
        raise ValueError(f"num_estimators must be a positive int, got {num_estimators!r}")


def _add_estimator_parameters(module: nn.Module, num_estimators: int, size_in: int, size_out: int, bias: bool,
                              factory: dict) -> None:
    """r_group (M, in), s_group (M, out) and bias (M, out) or None, registered in torch-uncertainty's order."""
    module.r_group = nn.Parameter(torch.empty((num_estimators, size_in), **factory))
    module.s_group = nn.Parameter(torch.empty((num_estimators, size_out), **factory))
    if bias:
        module.bias = nn.Parameter(torch.empty((num_estimators, size_out), **factory))
    else:
        module.register_parameter("bias", None)


def _reset_estimator_parameters(module: nn.Module, weight: Tensor) -> None:
    """r, s ~ N(1, 0.5); bias ~ U(+-1/sqrt(fan_in of the shared weight))."""
    nn.init.normal_(module.r_group, mean=1.0, std=0.5)
    nn.init.normal_(module.s_group, mean=1.0, std=0.5)
    if module.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(module.bias, -bound, bound)


class BatchLinear(NoTorchScript, nn.Module):
    """BatchEnsemble Linear: (x * r) W^T * s + bias with r, s, bias chosen by the estimator of each sample."""

    def __init__(self, in_features: int, out_features: int, num_estimators: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        _check_estimators(num_estimators)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_estimators = num_estimators
        self.linear = nn.Linear(in_features, out_features, bias=False, **factory)
        _add_estimator_parameters(self, num_estimators, in_features, out_features, bias, factory)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_estimators: int) -> "BatchLinear":
        """A fresh BatchLinear of the same shape as `linear` (its parameters are not copied)."""
        return cls(linear.in_features, linear.out_features, num_estimators, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)

    def reset_parameters(self) -> None:
        _reset_estimator_parameters(self, self.linear.weight)

    def forward(self, inputs: Tensor) -> Tensor:
        batch = inputs.shape[0]
        out = self.linear(inputs * per_sample(self.r_group, batch)) * per_sample(self.s_group, batch)
        return out if self.bias is None else out + per_sample(self.bias, batch)

    forward_eager = forward  # already stock PyTorch

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_estimators={self.num_estimators}, bias={self.bias is not None}")


class BatchConv2d(NoTorchScript, nn.Module):
    """BatchEnsemble Conv2d: conv(x * r, W) * s + bias with r, s, bias chosen by the estimator of each sample."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_estimators: int, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True, device=None, dtype=None) -> None:
        _check_estimators(num_estimators)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.num_estimators = num_estimators
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=False, **factory)
        _add_estimator_parameters(self, num_estimators, in_channels, out_channels, bias, factory)
        self.reset_parameters()

    @classmethod
    def from_conv2d(cls, conv2d: nn.Conv2d, num_estimators: int) -> "BatchConv2d":
        """A fresh BatchConv2d of the same geometry as `conv2d` (its parameters are not copied)."""
        return cls(conv2d.in_channels, conv2d.out_channels, conv2d.kernel_size, num_estimators,
                   stride=conv2d.stride, padding=conv2d.padding, dilation=conv2d.dilation, groups=conv2d.groups,
                   bias=conv2d.bias is not None, device=conv2d.weight.device, dtype=conv2d.weight.dtype)

    def reset_parameters(self) -> None:
        _reset_estimator_parameters(self, self.conv.weight)

    def _scales(self, batch: int):
        def expand(group):
            return per_sample(group, batch)[:, :, None, None]
        bias = None if self.bias is None else expand(self.bias)
        return expand(self.r_group), expand(self.s_group), bias

    def _check_input(self, inputs: Tensor) -> None:
        if inputs.dim() != 4:
            raise ValueError(f"BatchConv2d expects a 4-D input (N, C, H, W), got shape {tuple(inputs.shape)}")

    def forward(self, inputs: Tensor) -> Tensor:
        """conv through pe_kernels.functional; r, s, bias as separate elementwise passes (not fused yet).
        Calls `conv` instead when it has hooks or is not exactly an nn.Conv2d (nn/_common.py)."""
        c = self.conv
        reason = global_hook_reason() or module_reason("conv", c, nn.Conv2d)
        if reason is not None:
            out = self.forward_eager(inputs)
            record_module_path(self, reason)
            return out
        self._check_input(inputs)
        r, s, bias = self._scales(inputs.shape[0])
        out = PF.packed_conv2d(inputs * r, c.weight, None, c.stride, c.padding, c.dilation, c.groups,
                               c.padding_mode) * s
        return out if bias is None else out + bias

    def forward_eager(self, inputs: Tensor) -> Tensor:
        """The stock PyTorch computation (nn.Conv2d), as torch-uncertainty runs it."""
        self._check_input(inputs)
        r, s, bias = self._scales(inputs.shape[0])
        out = self.conv(inputs * r) * s
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, num_estimators={self.num_estimators}, stride={self.stride}")
