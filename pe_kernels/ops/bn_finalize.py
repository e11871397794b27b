"""`pe_kernels::bn_finalize` and `pe_kernels::bn_running_update`: BatchNorm from conv statistics.

With n = count (N*P*Q) and stats = [mean, m2] (m2 = sum of squared deviations, see ops/conv_fused.py)::

    mean = stats[0],  var = stats[1]/n  (biased),  invstd = (var + eps)^-1/2    (no clamp: NaN stays NaN)
    scale = weight * invstd,  shift = bias - mean * scale              (training BN as an affine map)
    running_mean <- (1-f) running_mean + f mean,  running_var <- (1-f) running_var + f m2/(n-1)

Backward of bn_finalize (`pe_kernels::bn_finalize_backward`, one kernel), g_tot = g_scale - mean * g_shift:
    d_weight = g_tot * invstd,  d_bias = g_shift,  d_var = g_tot * weight * (-1/2) * invstd^3,
    d_stats = [d_mean, d_m2] = [-scale * g_shift, d_var / n]

`f` is BatchNorm2d's exponential_average_factor (momentum, or 1/num_batches_tracked when momentum is None).
`bn_train_finalize` does a training batch's whole bookkeeping in one call (one kernel on the kernel backends):
num_batches_tracked += 1, the running update with f read on the device (no host sync, so a CUDA graph can
capture it) and (scale, shift). In eager mode it runs as an autograd.Function; under tracing (torch.compile,
export) as ATen ops for the bookkeeping + the bn_finalize custom op (a custom op cannot both mutate its inputs
and carry a gradient formula). Vectors are fp32 (fp64 for fp64 activations).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _backend, reference
from . import _transforms
from ._common import (check_vector, eager_context, eager_dispatch, empty_grad, mark_written, no_autocast,
                      pack_grads, unpack_grads)

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


@torch.library.custom_op("pe_kernels::bn_finalize_backward", mutates_args=())
def _bn_finalize_backward(grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], stats: Tensor, count: int,
                          weight: Optional[Tensor], eps: float, needs_grad: Sequence[bool],
                          backend: str = "") -> list[Tensor]:
    """`backend`: the request recorded by the forward ('' = the current request)."""
    args = (grad_scale, grad_shift, stats, count, weight, eps, needs_grad)
    return pack_grads(_backward_impl(args, backend), [stats, weight, stats], stats)


@_bn_finalize_backward.register_fake
def _bn_finalize_backward_fake(grad_scale, grad_shift, stats, count, weight, eps, needs_grad, backend=""):
    k = stats.shape[1]
    d_stats = stats.new_empty((2, k)) if needs_grad[0] else empty_grad(stats)
    d_weight = weight.new_empty((k,)) if weight is not None and needs_grad[1] else empty_grad(stats)
    d_bias = stats.new_empty((k,)) if needs_grad[2] else empty_grad(stats)
    return [d_stats, d_weight, d_bias]


def _backward_impl(args: tuple, backend: str) -> list[Optional[Tensor]]:
    stats = args[2]
    module, _ = _backend.select("bn_finalize_backward", stats.device, torch.float32, requested=backend, args=args)
    with no_autocast(stats.device):
        return module.bn_finalize_backward(*args)


def _setup_context(ctx, inputs, output):
    stats, count, weight, bias, eps = inputs[:5]
    ctx.save_for_backward(stats, weight)
    ctx.count, ctx.eps = count, eps
    ctx.backend = _backend.requested_backend()  # governs the backward, whatever thread autograd runs it on
    ctx.eager = False


def _backward(ctx, grad_scale, grad_shift):
    """The chain rule through mean, var and invstd: reference.bn_finalize_backward (one kernel on a kernel
    backend); under double backward, the composite ATen ops."""
    stats, weight = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in (0, 2, 3)]
    if _transforms.create_graph_required("bn_finalize_backward", ctx.backend):
        scale, shift = _transforms.bn_finalize(stats, ctx.count, weight, None, ctx.eps)
        d_stats, d_weight = _transforms.differentiable_vjp([scale, shift], [grad_scale, grad_shift],
                                                           [stats, weight], needs[:2])
        d_bias = grad_shift if needs[2] else None
    else:
        args = (grad_scale, grad_shift, stats, ctx.count, weight, ctx.eps, needs)
        if ctx.eager:
            d_stats, d_weight, d_bias = _backward_impl(args, ctx.backend)
        else:
            d_stats, d_weight, d_bias = unpack_grads(torch.ops.pe_kernels.bn_finalize_backward(*args, ctx.backend))
    return (d_stats, None, d_weight, d_bias, None) + (None,) * (len(ctx.needs_input_grad) - 5)


_bn_finalize.register_autograd(_backward, setup_context=_setup_context)


def _finalize_impl(function: str, finalize_args: tuple, args: tuple) -> tuple[Tensor, Tensor]:
    """backend.<function>(*args) on the backend bn_finalize would run (the op pe_kernels.autotune measures)."""
    stats = args[0]
    backend, _ = _backend.select("bn_finalize", stats.device, torch.float32, args=finalize_args)
    with no_autocast(stats.device):
        out = getattr(backend, function)(*args)
    if function == "bn_train_finalize":  # (stats, count, weight, bias, eps, running_mean, running_var, nbt, ...)
        mark_written(*args[5:8])  # written by the kernel: versions as an in-place ATen op's
    return out


class _BnFinalizeFunction(torch.autograd.Function):
    """Eager mode's bn_finalize (ops/_common.eager_dispatch), without torch.library's dispatch layers."""

    @staticmethod
    def forward(ctx, *args):
        return eager_context(ctx, _setup_context, args, _finalize_impl("bn_finalize", args, args))

    @staticmethod
    def backward(ctx, grad_scale, grad_shift):
        return _backward(ctx, grad_scale, grad_shift)


class _BnTrainFinalizeFunction(torch.autograd.Function):
    """Eager mode's bn_train_finalize: bn_finalize's gradient, the bookkeeping done by the same kernel."""

    @staticmethod
    def forward(ctx, *args):
        finalize_args = args[:5]  # (stats, count, weight, bias, eps): what bn_finalize's gradient needs
        return eager_context(ctx, _setup_context, finalize_args,
                             _finalize_impl("bn_train_finalize", finalize_args, args))

    @staticmethod
    def backward(ctx, grad_scale, grad_shift):
        return _backward(ctx, grad_scale, grad_shift)


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
    if eager_dispatch(stats, weight, bias):
        return _BnFinalizeFunction.apply(stats, count, weight, bias, float(eps))
    return torch.ops.pe_kernels.bn_finalize(stats, count, weight, bias, float(eps))


def bn_train_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                      num_batches_tracked: Optional[Tensor] = None,
                      momentum: Optional[float] = 0.1) -> tuple[Tensor, Tensor]:
    """A training BatchNorm's batch: num_batches_tracked += 1, running statistics updated with BatchNorm2d's
    average factor (momentum, or 1/num_batches_tracked when momentum is None: read on the device, no host sync),
    and (scale, shift) of bn_finalize, differentiable in stats, weight and bias."""
    k = _check_stats(stats, count)
    check_train_args(k, stats, weight, bias, eps, running_mean, running_var, num_batches_tracked)
    if running_mean is not None and count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
    momentum = None if momentum is None else float(momentum)
    dtype = stats.dtype
    weight = weight if weight is None or weight.dtype == dtype else weight.to(dtype)
    bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    if not _transforms.composite_required("bn_finalize") and eager_dispatch(stats, weight, bias, running_mean):
        return _BnTrainFinalizeFunction.apply(stats, count, weight, bias, float(eps), running_mean, running_var,
                                              num_batches_tracked, momentum)
    # traced, or under a torch.func transform: the bookkeeping as ATen ops (no host sync), then bn_finalize
    reference.bn_bookkeeping(stats.detach(), count, running_mean, running_var, num_batches_tracked, momentum)
    return bn_finalize(stats, count, weight, bias, eps)


def check_train_args(k: int, ref: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     num_batches_tracked: Optional[Tensor], prefix: str = "") -> None:
    """A training BatchNorm's arguments (bn_train_finalize, conv_bn_train): (k,) vectors on ref's device, running
    statistics given together, a one-element num_batches_tracked, eps > 0; ValueError/TypeError naming the values.
    `prefix` names the affine vectors ("bn_" for conv_bn_train)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for name, vec in ((f"{prefix}weight", weight), (f"{prefix}bias", bias), ("running_mean", running_mean),
                      ("running_var", running_var)):
        check_vector(vec, name, k, ref)
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1
                                            or num_batches_tracked.device != ref.device):
        raise ValueError(f"num_batches_tracked must be a one-element tensor on {ref.device}, got "
                         f"{tuple(num_batches_tracked.shape)} on {num_batches_tracked.device}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")


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
