"""`pe_kernels::bn_apply`: per-channel affine + optional residual (itself affine) + ReLU, one pass.

    out = act(y * scale[k] + shift[k] + residual * residual_scale[k] + residual_shift[k])

It is BN-apply + ReLU after a training conv, and the tail of a residual block (bn3 apply + shortcut-BN apply +
add + ReLU). Backward (`pe_kernels::bn_apply_backward`) fuses dReLU, g = where(out <= 0, 0, grad_out) (torch's
threshold_backward: the gradient passes where out is NaN), with the reductions sum(g*y) and sum(g); it
runs on the backend requested when the forward ran (recorded in the autograd context, see pe_kernels._backend).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _backend
from . import _transforms
from .contract import APPLY_GRAD_NAMES, param_dtype
from ._common import (CheckMemo, autocast_dtype, cast_vector, check_4d, check_floating, check_same_device,
                      check_vector, eager_context, eager_dispatch, empty_channels_last, empty_grad, no_autocast,
                      pack_grads, unpack_grads)

Tensor = torch.Tensor


@torch.library.custom_op("pe_kernels::bn_apply", mutates_args=())
def _bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], residual_scale: Optional[Tensor],
              residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    return _forward_impl((y, scale, shift, residual, residual_scale, residual_shift, relu))


def _forward_impl(args: tuple) -> Tensor:
    y = args[0]
    backend, _ = _backend.select("bn_apply", y.device, y.dtype, args=args)
    with no_autocast(y.device):
        return backend.bn_apply(*args)


@_bn_apply.register_fake
def _bn_apply_fake(y, scale, shift, residual, residual_scale, residual_shift, relu):
    return empty_channels_last(y, y.shape)


@torch.library.custom_op("pe_kernels::bn_apply_backward", mutates_args=())
def _bn_apply_backward(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool, out: Tensor,
                       needs_grad: Sequence[bool], backend: str = "") -> list[Tensor]:
    """`backend`: the request recorded by the forward ('' = the current request)."""
    args = (grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out, needs_grad)
    return pack_grads(_backward_impl(args, backend), [y, scale, shift, residual, residual_scale, residual_shift], y)


def _backward_impl(args: tuple, backend: str) -> list[Optional[Tensor]]:
    y = args[1]
    module, _ = _backend.select("bn_apply_backward", y.device, y.dtype, requested=backend, args=args)
    with no_autocast(y.device):
        return module.bn_apply_backward(*args)


@_bn_apply_backward.register_fake
def _bn_apply_backward_fake(grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out,
                            needs_grad, backend=""):
    likes = [y, scale, shift, residual, residual_scale, residual_shift]
    result = []
    for name, like, need in zip(APPLY_GRAD_NAMES, likes, needs_grad):
        if like is None or not need:
            result.append(empty_grad(y))
        elif like.dim() == 4:
            result.append(empty_channels_last(like, like.shape))
        else:
            result.append(like.new_empty(like.shape))
    return result


def _setup_context(ctx, inputs, output):
    y, scale, shift, residual, residual_scale, residual_shift, relu = inputs
    ctx.save_for_backward(y, scale, shift, residual, residual_scale, residual_shift, output)
    ctx.relu = relu
    ctx.backend = _backend.requested_backend()  # governs the backward, whatever thread autograd runs it on
    ctx.eager = False


def _backward(ctx, grad_out):
    y, scale, shift, residual, residual_scale, residual_shift, out = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in range(6)]
    if _transforms.create_graph_required("bn_apply_backward", ctx.backend):  # double backward
        out = _transforms.bn_apply(y, scale, shift, residual, residual_scale, residual_shift, ctx.relu)
        inputs = [y, scale, shift, residual, residual_scale, residual_shift]
        return (*_transforms.differentiable_vjp([out], [grad_out], inputs, needs), None)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if ctx.eager:  # the autograd.Function of eager mode: the backend directly
        grads = _backward_impl((grad_out, y, scale, shift, residual, residual_scale, residual_shift, ctx.relu, out,
                                needs), ctx.backend)
    else:
        grads = unpack_grads(torch.ops.pe_kernels.bn_apply_backward(
            grad_out, y, scale, shift, residual, residual_scale, residual_shift, ctx.relu, out, needs, ctx.backend))
    return (*grads, None)


_bn_apply.register_autograd(_backward, setup_context=_setup_context)


class _BnApplyFunction(torch.autograd.Function):
    """Eager mode's entry (ops/_common.eager_dispatch): the custom op without torch.library's dispatch layers."""

    @staticmethod
    def forward(ctx, *args):
        return eager_context(ctx, _setup_context, args, _forward_impl(args))

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


def bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
             residual_scale: Optional[Tensor] = None, residual_shift: Optional[Tensor] = None,
             relu: bool = False) -> Tensor:
    """Checked, autocast-aware entry to `pe_kernels::bn_apply` (see the module docstring)."""
    _CHECKS.run(_check_apply_args, y, scale, shift, residual, residual_scale, residual_shift)
    amp = autocast_dtype(y)
    if amp is not None:
        y = y.to(amp)
    residual, residual_scale, residual_shift = cast_residual(y, residual, residual_scale, residual_shift)
    vec_dtype = param_dtype(y.dtype)
    scale, shift = cast_vector(scale, vec_dtype), cast_vector(shift, vec_dtype)
    if _transforms.composite_required("bn_apply"):
        return _transforms.bn_apply(y, scale, shift, residual, residual_scale, residual_shift, bool(relu))
    args = (y, scale, shift, residual, residual_scale, residual_shift, bool(relu))
    if eager_dispatch(y, scale, shift, residual, residual_scale, residual_shift):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
            return _BnApplyFunction.apply(*args)
        return _forward_impl(args)
    return torch.ops.pe_kernels.bn_apply(*args)


_CHECKS = CheckMemo()  # the checks of bn_apply's and conv_bn_act's arguments, once per metadata


def _check_apply_args(y, scale, shift, residual, residual_scale, residual_shift) -> None:
    check_4d(y, "y")
    check_floating(y, "y")
    k = y.shape[1]
    for name, vec in (("scale", scale), ("shift", shift)):
        check_vector(vec, name, k, y)
    check_residual(y, tuple(y.shape), residual, residual_scale, residual_shift)


def check_residual(like: Tensor, shape: tuple, residual: Optional[Tensor], residual_scale: Optional[Tensor],
                   residual_shift: Optional[Tensor]) -> None:
    """bn_apply's residual arguments for an output of `shape` on like's device (ValueError / TypeError naming
    them)."""
    k = shape[1]
    for name, vec in (("residual_scale", residual_scale), ("residual_shift", residual_shift)):
        check_vector(vec, name, k, like)
    if residual is None and (residual_scale is not None or residual_shift is not None):
        raise ValueError("residual_scale/residual_shift given without a residual")
    if residual is not None:
        check_4d(residual, "residual")
        check_same_device(residual, "residual", like)
        if tuple(residual.shape) != tuple(shape):
            raise ValueError(f"residual has shape {tuple(residual.shape)}, y has {tuple(shape)}")


def cast_residual(like: Tensor, residual: Optional[Tensor], residual_scale: Optional[Tensor],
                  residual_shift: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The residual in like's dtype, its affine vectors in the per-channel dtype (checked by check_residual)."""
    if residual is not None and residual.dtype != like.dtype:
        residual = residual.to(like.dtype)
    vec_dtype = param_dtype(like.dtype)
    return residual, cast_vector(residual_scale, vec_dtype), cast_vector(residual_shift, vec_dtype)
