"""The `torch` backend: the ATen reference of every op (cuDNN on GPU, native kernels on CPU).

This file is the numerical oracle and the fallback. Every other backend (triton/, cuda/) implements the
same functions with the same arguments and must agree with these within the error budget of DESIGN.md.

The kernel family (one grouped convolution with a prologue and an epilogue)::

    x'   = act_in(x * in_scale[c] + in_shift[c])                 prologue; the conv's zero padding stays zero
    acc  = conv(x', w, stride, padding, dilation, groups) + bias[k]
    y    = act_out(acc * out_scale[k] + out_shift[k] + residual)  epilogue, stored in x.dtype, channels_last
    stats[0, k] = mean_k = (1/n) sum_{n,p,q} acc_s,   stats[1, k] = m2_k = sum_{n,p,q} (acc_s - mean_k)**2
                  acc_s = acc rounded to x.dtype (and back to fp32)   (optional, fp32; n = N*P*Q; two passes)

The statistics describe acc as stored (acc_s = acc.to(x.dtype).to(fp32); acc itself for fp32/fp64), so that
a BN apply of the stored y with them is exact where stock BatchNorm is (a constant channel gives exactly the BN
bias); the backward's statistics term uses the same acc_s: 2 * grad_stats[1] * (acc_s - mean).

The statistics are the mean and the sum of squared deviations (m2), not [sum acc, sum acc^2]: the one-pass
form cancels catastrophically when a channel's mean is large against its spread. An empty problem gives
mean = m2 = 0.

BatchNorm (training) from those statistics::

    var = m2 / n   (biased),  invstd = 1 / sqrt(var + eps)       (no clamp: a NaN m2 gives NaN, as torch)
    scale = weight * invstd,  shift = bias - mean * scale
    running_mean += f * (mean - running_mean),  running_var += f * (m2 / (n - 1) - running_var)

Apply (the BN tail of a residual block when `residual_scale` is given)::

    out = act(y * scale[k] + shift[k] + residual * residual_scale[k] + residual_shift[k])

Scale gradients (d_scale = sum g*y, d_residual_scale, d_in_scale, d_out_scale) are formed centred on the channel's
shift (sum_centred), so that the BatchNorm weight gradient they become (sum g*y - mean * sum g) does not cancel.

Dtypes: activations and weights in fp16, bf16, fp32 or fp64; per-channel vectors (scales, shifts,
statistics) in fp32 (fp64 when the activations are fp64). All 4-D outputs are channels_last.
ReLU backward (prologue, epilogue, apply) is torch's threshold_backward: g = where(v <= 0, 0, grad), so the
gradient passes where the pre-activation or output is NaN.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .ops.contract import (APPLY_GRAD_NAMES, CONV_BN_GRAD_NAMES, CONV_GRAD_NAMES,  # noqa: F401 (re-exported)
                           FINALIZE_GRAD_NAMES, check_backward_stats, composed_conv_bn_train,
                           composed_conv_bn_train_backward, grad_like_weight, param_dtype)

Tensor = torch.Tensor

__all__ = [
    "param_dtype",
    "conv_fused",
    "conv_fused_backward",
    "bn_finalize",
    "bn_running_update",
    "bn_train_finalize",
    "bn_finalize_backward",
    "bn_apply",
    "bn_apply_backward",
]

# The contract (gradient orders, the per-channel dtype, shared checks) lives in ops/contract.py.


def channels_last_like(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Copy `value` into a fresh channels_last tensor (the strides the fake implementations promise)."""
    out = torch.empty(value.shape, dtype=dtype, device=value.device, memory_format=torch.channels_last)
    out.copy_(value)
    return out


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _conv_fused_math(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu,
                     stride, padding, dilation, groups):
    """Differentiable composition of ATen ops; returns (acc in fp32/fp64, y before the downcast)."""
    acc_dtype = param_dtype(x.dtype)
    if in_scale is not None or in_shift is not None or in_relu:
        xp = x.to(acc_dtype)
        if in_scale is not None:
            xp = xp * _per_channel(in_scale)
        if in_shift is not None:
            xp = xp + _per_channel(in_shift)
        if in_relu:
            xp = torch.relu(xp)
        xp = xp.to(x.dtype)
    else:
        xp = x
    acc = F.conv2d(xp, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups).to(acc_dtype)
    if bias is not None:
        acc = acc + _per_channel(bias.to(acc_dtype))
    z = acc
    if out_scale is not None:
        z = z * _per_channel(out_scale)
    if out_shift is not None:
        z = z + _per_channel(out_shift)
    if residual is not None:
        z = z + residual.to(acc_dtype)
    if out_relu:
        z = torch.relu(z)
    return acc, z


def sum_centred(g: Tensor, v: Tensor, g_sum: Tensor) -> Tensor:
    """Per channel, sum over (N, H, W) of g * v, formed as sum g (v - v0) + v0 * g_sum, with v0 the channel's first
    value (0 where it is not finite: then the plain sum) and g_sum = sum g (the caller's shift gradient). The
    scale gradients (sum g*y of an apply, sum g*x of a prologue, sum g*acc of an epilogue) reach a BatchNorm
    weight as sum g*y - mean * sum g (bn_finalize backward, or the folded affine's autograd in eval): formed
    plainly, the fp32 rounding of sum g*y (n u |mean| sum |g|) survives that cancellation and is multiplied by
    invstd (up to 1/sqrt(eps) at a constant channel); shifted, only a rounding of v0 * sum g does (|v - v0| is of
    the channel's spread). One shift a channel, as the CUDA kernels' (a view: no extra pass over v)."""
    dims = (0, 2, 3)
    if v.numel() == 0:
        return (g * v).sum(dims)
    v0 = torch.nan_to_num(v[0, :, 0, 0], nan=0.0, posinf=0.0, neginf=0.0)
    return (g * (v - _per_channel(v0))).sum(dims) + torch.where(v0 == 0, 0.0, v0 * g_sum)


def _relu_backward(grad: Tensor, v: Tensor) -> Tensor:
    """torch's threshold_backward: zero where v <= 0, the gradient elsewhere (NaN v included)."""
    return torch.where(v <= 0, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)


def stored_acc(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """acc (fp32/fp64) rounded to the stored activation dtype and back: the values the statistics are taken of
    (and the conv backward's acc - mean uses). Identity for fp32/fp64 activations. In fp16/bf16 the statistics
    must describe the rounded y that the BN apply normalises: statistics of the unrounded accumulator applied to
    the rounded y turn the rounding into (y - mean) * invstd, up to 1/sqrt(eps) times it at a constant channel."""
    return acc if acc.dtype == dtype else acc.to(dtype).to(acc.dtype)


def _stats(acc: Tensor) -> Tensor:
    """[mean, m2] per channel of a 4-D tensor, two passes in its dtype (zeros when it is empty)."""
    dims = (0, 2, 3)
    n = acc.shape[0] * acc.shape[2] * acc.shape[3]
    mean = acc.sum(dim=dims) / max(n, 1)
    m2 = (acc - _per_channel(mean)).square().sum(dim=dims)
    return torch.stack([mean, m2])


def conv_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor],
               out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
               compute_stats: bool) -> tuple[Tensor, Tensor]:
    """Grouped conv with prologue/epilogue (module docstring). Returns (y, stats).

    x (N, C, H, W); weight (K, C/groups, R, S); bias, out_scale, out_shift (K,); in_scale, in_shift (C,);
    residual (N, K, P, Q). y is channels_last in x.dtype; stats is (2, K) [mean, m2] in fp32 (fp64 for fp64 x)
    when compute_stats, else (0,).
    """
    acc, z = _conv_fused_math(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                              out_relu, stride, padding, dilation, groups)
    y = channels_last_like(z, x.dtype)
    stats = _stats(stored_acc(acc, x.dtype)) if compute_stats else acc.new_empty((0,))
    return y, stats.contiguous()


def conv_fused_backward(grad_y: Tensor, grad_stats: Optional[Tensor], x: Tensor, weight: Tensor,
                        bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                        in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                        residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int, y: Tensor,
                        needs_grad: Sequence[bool], stats: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Gradients of conv_fused w.r.t. CONV_GRAD_NAMES (None where needs_grad is False or the input is None).

    g     = where(z <= 0, 0, grad_y) if out_relu else grad_y    (z: the epilogue before the downcast)
    g_acc = g * out_scale + grad_stats[0] / n + 2 * grad_stats[1] * (acc_s - stats[0])   (n = N*P*Q; acc_s:
            acc rounded to x.dtype, the values the forward's statistics were taken of)
    d_out_shift = sum g, d_out_scale = sum g * acc, d_bias = sum g_acc, d_residual = g
    dx', dw = convolution_backward(g_acc)   (ATen: cuDNN on GPU)
    dpre = where(pre <= 0, 0, dx') if in_relu,  dx = dpre * in_scale,  d_in_scale = sum dpre * x,
    d_in_shift = sum dpre
    `stats` is the forward's (2, K) [mean, m2], needed whenever grad_stats is given. `y` (the forward output) is
    not needed here: this oracle recomputes acc and z.
    """
    need = dict(zip(CONV_GRAD_NAMES, needs_grad))
    acc_dtype = param_dtype(x.dtype)
    dims = (0, 2, 3)
    if grad_stats is not None and grad_stats.numel() == 0:
        grad_stats = None
    check_backward_stats(grad_stats, stats, weight.shape[0])
    has_prologue = in_scale is not None or in_shift is not None or in_relu
    pre = None
    if has_prologue:
        pre = x.to(acc_dtype)
        if in_scale is not None:
            pre = pre * _per_channel(in_scale)
        if in_shift is not None:
            pre = pre + _per_channel(in_shift)
        xp = (torch.relu(pre) if in_relu else pre).to(x.dtype)
    else:
        xp = x
    acc, z = _conv_fused_math(xp, weight, bias, None, None, False, out_scale, out_shift, residual, out_relu,
                              stride, padding, dilation, groups)
    g = grad_y.to(acc_dtype)
    if out_relu:
        g = _relu_backward(g, z)
    out: dict[str, Optional[Tensor]] = dict.fromkeys(CONV_GRAD_NAMES)
    if residual is not None and need["residual"]:
        out["residual"] = channels_last_like(g, residual.dtype)
    g_sum = g.sum(dims) if (out_shift is not None and need["out_shift"]) or need["out_scale"] else None
    if out_shift is not None and need["out_shift"]:
        out["out_shift"] = g_sum
    if out_scale is not None and need["out_scale"]:
        out["out_scale"] = sum_centred(g, acc, g_sum)
    g_acc = g if out_scale is None else g * _per_channel(out_scale)
    if grad_stats is not None:
        n = acc.shape[0] * acc.shape[2] * acc.shape[3]
        gs, mean = grad_stats.to(acc_dtype), stats.to(acc_dtype)[0]
        acc_s = stored_acc(acc, x.dtype)  # the values the forward's statistics were taken of
        g_acc = g_acc + _per_channel(gs[0] / max(n, 1)) + 2 * _per_channel(gs[1]) * (acc_s - _per_channel(mean))
    if bias is not None and need["bias"]:
        out["bias"] = g_acc.sum(dims).to(bias.dtype)
    need_dxp = need["x"] or need["in_scale"] or need["in_shift"]
    if need_dxp or need["weight"]:
        dxp, dw, _ = torch.ops.aten.convolution_backward(
            g_acc.to(x.dtype), xp, weight, None, list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [need_dxp, need["weight"], False])
        if need["weight"]:
            out["weight"] = grad_like_weight(dw, weight)
        if need_dxp:
            dpre = dxp.to(acc_dtype)
            if in_relu:
                dpre = _relu_backward(dpre, pre)
            if need["x"]:
                dx = dpre if in_scale is None else dpre * _per_channel(in_scale)
                out["x"] = channels_last_like(dx, x.dtype)
            dpre_sum = dpre.sum(dims) if need["in_scale"] or need["in_shift"] else None
            if in_scale is not None and need["in_scale"]:
                out["in_scale"] = sum_centred(dpre, x.to(acc_dtype), dpre_sum)
            if in_shift is not None and need["in_shift"]:
                out["in_shift"] = dpre_sum
    return [out[name] for name in CONV_GRAD_NAMES]


def bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """Training-mode BN as an affine map from the batch statistics [mean, m2]: returns (scale, shift), each (K,)."""
    mean = stats[0]
    var = stats[1] / count
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    return scale.contiguous(), shift.contiguous()


def bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                      momentum: float) -> None:
    """In place, as BatchNorm2d: running = (1 - momentum) * running + momentum * batch (unbiased var m2/(n-1))."""
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
    with torch.no_grad():
        mean = stats[0]
        var = stats[1] / (count - 1)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def average_factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> Tensor | float:
    """BatchNorm2d's exponential_average_factor after its num_batches_tracked bump: momentum, or 1/num_batches_tracked
    (a tensor: no host sync) when momentum is None, or 0.0 when momentum and num_batches_tracked are both None."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / num_batches_tracked.to(torch.float64)


def bn_train_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> tuple[Tensor, Tensor]:
    """Training BatchNorm's whole per-batch bookkeeping, as BatchNorm2d does it, in one call (one kernel in the
    kernel backends): num_batches_tracked += 1 (when given); running_mean/running_var updated in place with
    f = average_factor(momentum, num_batches_tracked) (when given; count >= 2); returns bn_finalize's
    (scale, shift). momentum None is the cumulative average, f = 1 / num_batches_tracked after the bump, read on
    the device (no host sync)."""
    bn_bookkeeping(stats, count, running_mean, running_var, num_batches_tracked, momentum)
    return bn_finalize(stats, count, weight, bias, eps)


def bn_bookkeeping(stats: Tensor, count: int, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> None:
    """bn_train_finalize's in-place part: the num_batches_tracked bump and the running update (ATen ops)."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is not None and running_var is not None:
            if count < 2:
                raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
            f = average_factor(momentum, num_batches_tracked)
            mean, var = stats[0], stats[1] / (count - 1)
            running_mean.copy_((running_mean * (1 - f) + mean * f).to(running_mean.dtype))
            running_var.copy_((running_var * (1 - f) + var * f).to(running_var.dtype))


def bn_finalize_backward(grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], stats: Tensor, count: int,
                         weight: Optional[Tensor], eps: float, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Gradients of bn_finalize's (scale, shift) w.r.t. FINALIZE_GRAD_NAMES (None where not needed or absent).

    invstd = (m2/n + eps)^-1/2, scale = w invstd, shift = b - mean scale; with g_tot = g_scale - mean g_shift:
    d_weight = g_tot invstd,  d_bias = g_shift,  d_stats = [-scale g_shift, g_tot w (-1/2) invstd^3 / n]."""
    need = dict(zip(FINALIZE_GRAD_NAMES, needs_grad))
    mean, m2 = stats[0], stats[1]
    invstd = torch.rsqrt(m2 / count + eps)
    w = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    g_scale = torch.zeros_like(invstd) if grad_scale is None else grad_scale.to(invstd.dtype)
    g_shift = torch.zeros_like(invstd) if grad_shift is None else grad_shift.to(invstd.dtype)
    g_tot = g_scale - mean * g_shift
    out: dict[str, Optional[Tensor]] = dict.fromkeys(FINALIZE_GRAD_NAMES)
    if need["stats"]:
        out["stats"] = torch.stack([-(w * invstd) * g_shift, g_tot * w * (-0.5) * invstd ** 3 / count])
    if need["weight"] and weight is not None:
        out["weight"] = (g_tot * invstd).to(weight.dtype)
    if need["bias"]:
        out["bias"] = g_shift.clone() if grad_shift is not None else g_shift
    return [out[name] for name in FINALIZE_GRAD_NAMES]


def conv_bn_train(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor],
                  momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training conv -> BatchNorm's batch in one call: (y, stats, scale, shift) = conv_fused with statistics (no
    epilogue), then bn_train_finalize of those statistics (count N*P*Q; running statistics and num_batches_tracked
    updated in place). BN(conv(x)) = y * scale + shift."""
    return composed_conv_bn_train(sys.modules[__name__], x, weight, bias, in_scale, in_shift, in_relu, stride,
                                  padding, dilation, groups, bn_weight, bn_bias, eps, running_mean, running_var,
                                  num_batches_tracked, momentum)


def conv_bn_train_backward(grad_y: Optional[Tensor], grad_scale: Optional[Tensor], grad_shift: Optional[Tensor],
                           x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                           in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], groups: int, y: Tensor, stats: Tensor,
                           bn_weight: Optional[Tensor], eps: float,
                           needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Gradients of conv_bn_train's (y, scale, shift) w.r.t. CONV_BN_GRAD_NAMES: bn_finalize_backward gives
    grad_stats, conv_fused_backward the rest; so that, with d_mean, d_m2 = grad_stats,
        g_acc = grad_y + d_mean / n + 2 d_m2 (y - mean)."""
    return composed_conv_bn_train_backward(sys.modules[__name__], grad_y, grad_scale, grad_shift, x, weight, bias,
                                           in_scale, in_shift, in_relu, stride, padding, dilation, groups, y, stats,
                                           bn_weight, eps, needs_grad)


def _bn_apply_math(y, scale, shift, residual, residual_scale, residual_shift, relu):
    acc_dtype = param_dtype(y.dtype)
    z = y.to(acc_dtype) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        r = residual.to(acc_dtype)
        if residual_scale is not None:
            r = r * _per_channel(residual_scale)
        if residual_shift is not None:
            r = r + _per_channel(residual_shift)
        z = z + r
    if relu:
        z = torch.relu(z)
    return z


def bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    """out = act(y*scale + shift + residual*residual_scale + residual_shift), channels_last in y.dtype."""
    z = _bn_apply_math(y, scale, shift, residual, residual_scale, residual_shift, relu)
    return channels_last_like(z, y.dtype)


def bn_apply_backward(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                      residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool,
                      out: Tensor, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Gradients of bn_apply w.r.t. APPLY_GRAD_NAMES; `out` is the forward output (gives the ReLU mask)."""
    acc_dtype = param_dtype(y.dtype)
    g = grad_out.to(acc_dtype)
    if relu:
        g = _relu_backward(g, out)
    dims = (0, 2, 3)
    need = dict(zip(APPLY_GRAD_NAMES, needs_grad))
    result: dict[str, Optional[Tensor]] = dict.fromkeys(APPLY_GRAD_NAMES)
    if need["y"]:
        result["y"] = channels_last_like(g * _per_channel(scale), y.dtype)
    g_sum = g.sum(dims) if need["scale"] or need["shift"] or need["residual_scale"] or need["residual_shift"] \
        else None
    if need["scale"]:
        result["scale"] = sum_centred(g, y.to(acc_dtype), g_sum)
    if need["shift"]:
        result["shift"] = g_sum
    if residual is not None:
        if need["residual"]:
            dr = g if residual_scale is None else g * _per_channel(residual_scale)
            result["residual"] = channels_last_like(dr, residual.dtype)
        if need["residual_scale"] and residual_scale is not None:
            result["residual_scale"] = sum_centred(g, residual.to(acc_dtype), g_sum)
        if need["residual_shift"] and residual_shift is not None:
            result["residual_shift"] = g_sum.clone() if need["shift"] else g_sum   # outputs must not alias
    return [result[name] for name in APPLY_GRAD_NAMES]
