"""`pe_kernels::bn_finalize` and `pe_kernels::bn_running_update`: BatchNorm from conv statistics.

With n = count (N*P*Q) and stats = [mean, m2] (m2 = sum of squared deviations, see ops/conv_fused.py)::

    mean = stats[0],  var = stats[1]/n  (biased),  invstd = (var + eps)^-1/2    (no clamp: NaN stays NaN)
    scale = weight * invstd,  shift = bias - mean * scale              (training BN as an affine map)
    running_mean <- (1-f) running_mean + f mean,  running_var <- (1-f) running_var + f m2/(n-1)

Backward of bn_finalize (plain torch on K-vectors), g_tot = g_scale - mean * g_shift:
    d_weight = g_tot * invstd,  d_bias = g_shift,  d_var = g_tot * weight * (-1/2) * invstd^3,
    d_stats = [d_mean, d_m2] = [-scale * g_shift, d_var / n]

`f` is BatchNorm2d's exponential_average_factor (momentum, or 1/num_batches_tracked when momentum is None);
the module computes it, exactly as BatchNorm2d does. Vectors are fp32 (fp64 for fp64 activations).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _transforms
from ._common import check_vector, no_autocast

Tensor = torch.Tensor


@torch.library.custom_op("pe_kernels::bn_finalize", mutates_args=())
def _bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float) -> tuple[Tensor, Tensor]:
    args = (stats, count, weight, bias, eps)
    backend, _ = _backend.select("bn_finalize", stats.device, torch.float32, args=args)
    with no_autocast(stats.device):
        return backend.bn_finalize(*args)


@_bn_finalize.register_fake
def _bn_finalize_fake(stats, count, weight, bias, eps):
    k = stats.shape[1]
    return stats.new_empty((k,)), stats.new_empty((k,))


def _setup_context(ctx, inputs, output):
    stats, count, weight, bias, eps = inputs
    ctx.save_for_backward(stats, weight)
    ctx.count, ctx.eps = count, eps


def _backward(ctx, grad_scale, grad_shift):
    """Chain rule through mean, var and invstd (K-element vectors: plain torch ops)."""
    stats, weight = ctx.saved_tensors
    n = ctx.count
    mean = stats[0]
    var = stats[1] / n
    invstd = torch.rsqrt(var + ctx.eps)
    w = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    scale = w * invstd
    g_scale = torch.zeros_like(invstd) if grad_scale is None else grad_scale
    g_shift = torch.zeros_like(invstd) if grad_shift is None else grad_shift
    g_scale_total = g_scale - mean * g_shift                 # shift = bias - mean * scale
    d_weight = g_scale_total * invstd if weight is not None and ctx.needs_input_grad[2] else None
    d_bias = g_shift if ctx.needs_input_grad[3] else None
    d_var = g_scale_total * w * (-0.5) * invstd ** 3
    d_stats = torch.stack([-scale * g_shift, d_var / n]) if ctx.needs_input_grad[0] else None
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return d_stats, None, d_weight, d_bias, None


_bn_finalize.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pe_kernels::bn_running_update", mutates_args=("running_mean", "running_var"))
def _bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                       momentum: float) -> None:
    args = (stats, count, running_mean, running_var, momentum)
    backend, _ = _backend.select("bn_running_update", stats.device, torch.float32, args=args)
    with no_autocast(stats.device):
        backend.bn_running_update(*args)


@_bn_running_update.register_fake
def _bn_running_update_fake(stats, count, running_mean, running_var, momentum):
    return None


def _check_stats(stats: Tensor, count: int) -> int:
    if stats.dim() != 2 or stats.shape[0] != 2:
        raise ValueError(f"stats must have shape (2, K), got {tuple(stats.shape)}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int (N*H*W), got {count!r}")
    return stats.shape[1]


def bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) of training-mode BatchNorm from the statistics of `count` values per channel."""
    k = _check_stats(stats, count)
    check_vector(weight, "weight", k, stats)
    check_vector(bias, "bias", k, stats)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    dtype = stats.dtype
    weight = weight if weight is None else weight.to(dtype)
    bias = bias if bias is None else bias.to(dtype)
    if _transforms.composite_required("bn_finalize"):
        return _transforms.bn_finalize(stats, count, weight, bias, float(eps))
    return torch.ops.pe_kernels.bn_finalize(stats, count, weight, bias, float(eps))


def bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                      momentum: float) -> None:
    """Update BatchNorm running statistics in place from batch statistics (momentum = the average factor)."""
    k = _check_stats(stats, count)
    check_vector(running_mean, "running_mean", k, stats)
    check_vector(running_var, "running_var", k, stats)
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
    if _transforms.composite_required("bn_running_update"):
        _transforms.bn_running_update(stats, count, running_mean, running_var, float(momentum))
        return
    torch.ops.pe_kernels.bn_running_update(stats, count, running_mean, running_var, float(momentum))
