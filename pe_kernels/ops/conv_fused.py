"""`pe_kernels::conv_fused`: grouped conv with a fused prologue, epilogue and per-channel statistics.

    x'    = act_in(x * in_scale[c] + in_shift[c])                  (padding stays zero)
    acc   = conv(x', w, stride, padding, dilation, groups) + bias[k]
    y     = act_out(acc * out_scale[k] + out_shift[k] + residual)   channels_last, x.dtype
    stats = [mean, m2] over N, P, Q  (n = N*P*Q values per channel)   (2, K) fp32, or (0,) when not asked
            mean = sum acc_s / n,  m2 = sum (acc_s - mean)^2  (computed stably: two passes / Chan merges, no clamp)
            acc_s = acc rounded to x.dtype and back (acc itself in fp32/fp64): the statistics of y as stored

Backward (`pe_kernels::conv_fused_backward`) returns the gradients of x, weight, bias, in_scale, in_shift,
out_scale, out_shift and residual; the gradient of `stats` flows back through acc,
    g_acc = g * out_scale + grad_stats[0] / n + 2 * grad_stats[1] * (acc_s - mean),
so it takes the forward's `stats` (saved in the autograd context). ReLU backward (prologue and epilogue) is
torch's: where(v <= 0, 0, grad), the gradient passes where v is NaN. Both ops dispatch to the
backend chosen by pe_kernels._backend; the backward to the one requested when the forward ran (`backend`, recorded
in the autograd context, since autograd may run the backward on a thread that does not see use_backend()).
Autocast: x, weight, bias and residual run in the autocast dtype, the per-channel vectors and the statistics stay
fp32.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _backend
from . import _transforms
from .contract import CONV_GRAD_NAMES, ConvArgs, check_backward_stats, param_dtype
from ._common import (CheckMemo, autocast_dtype, cast_activation, cast_vector, check_4d, check_floating,
                      check_same_device, check_vector, eager_context, eager_dispatch, empty_channels_last, empty_grad,
                      no_autocast, pack_grads, pair, unpack_grads)

Tensor = torch.Tensor


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("pe_kernels::conv_fused", mutates_args=())
def _conv_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                residual: Optional[Tensor], out_relu: bool, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, compute_stats: bool) -> tuple[Tensor, Tensor]:
    return _forward_impl((x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu,
                          stride, padding, dilation, groups, compute_stats))


def _forward_impl(args: tuple, plan_key: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """backend.conv_fused(*args) on the selected backend; with `plan_key` (checked_args_keyed: the op's metadata
    key, which determines the metadata of every argument) through the backend's `conv_fused_keyed(plan_key, *args)`
    where it has one (ops/contract.py: its launch plan keyed on it, no second key)."""
    x = args[0]
    backend, _ = _backend.select("conv_fused", x.device, x.dtype, args=args)
    with no_autocast(x.device):
        if plan_key is not None:
            keyed = getattr(backend, "conv_fused_keyed", None)
            if keyed is not None:
                return keyed(plan_key, *args)
        return backend.conv_fused(*args)


@_conv_fused.register_fake
def _conv_fused_fake(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu,
                     stride, padding, dilation, groups, compute_stats):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    p = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    y = empty_channels_last(x, (n, k, p, q))
    stats = x.new_empty((2, k) if compute_stats else (0,), dtype=param_dtype(x.dtype))
    return y, stats


@torch.library.custom_op("pe_kernels::conv_fused_backward", mutates_args=())
def _conv_fused_backward(grad_y: Tensor, grad_stats: Optional[Tensor], x: Tensor, weight: Tensor,
                         bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                         in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                         residual: Optional[Tensor], out_relu: bool, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int, y: Tensor, needs_grad: Sequence[bool],
                         stats: Optional[Tensor] = None, backend: str = "") -> list[Tensor]:
    """`stats`: the forward's (2, K) [mean, m2], needed when grad_stats is given. `backend`: the request recorded
    by the forward ('' = the current request)."""
    args = (grad_y, grad_stats, x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
            out_relu, stride, padding, dilation, groups, y, needs_grad, stats)
    grads = _backward_impl(args, backend)
    likes = [x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual]
    return pack_grads(grads, likes, x)


def _backward_impl(args: tuple, backend: str) -> list[Optional[Tensor]]:
    grad_stats, x, weight, stats = args[1], args[2], args[3], args[18]
    check_backward_stats(grad_stats if grad_stats is not None and grad_stats.numel() else None, stats,
                         weight.shape[0])
    module, _ = _backend.select("conv_fused_backward", x.device, x.dtype, requested=backend, args=args)
    with no_autocast(x.device):
        return module.conv_fused_backward(*args)


@_conv_fused_backward.register_fake
def _conv_fused_backward_fake(grad_y, grad_stats, x, weight, bias, in_scale, in_shift, in_relu, out_scale,
                              out_shift, residual, out_relu, stride, padding, dilation, groups, y, needs_grad,
                              stats=None, backend=""):
    likes = [x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual]
    out = []
    for name, like, need in zip(CONV_GRAD_NAMES, likes, needs_grad):
        if like is None or not need:
            out.append(empty_grad(x))
        elif name in ("x", "residual"):
            out.append(empty_channels_last(like, like.shape))
        else:  # the weight's gradient in the weight's strides (the kernels write dw so), vectors contiguous
            out.append(torch.empty_like(like))
    return out


def _setup_context(ctx, inputs, output):
    (x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu, stride, padding,
     dilation, groups, compute_stats) = inputs
    stats = output[1] if compute_stats else None  # the gradient of stats flows through acc - mean
    ctx.save_for_backward(x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, output[0], stats)
    ctx.config = (in_relu, out_relu, list(stride), list(padding), list(dilation), groups, compute_stats)
    ctx.backend = _backend.requested_backend()  # governs the backward, whatever thread autograd runs it on
    ctx.eager = False


def _backward(ctx, grad_y, grad_stats):
    x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, y, stats = ctx.saved_tensors
    in_relu, out_relu, stride, padding, dilation, groups, compute_stats = ctx.config
    tensor_inputs = (0, 1, 2, 3, 4, 6, 7, 8)  # positions of x ... residual among the op's inputs
    needs = [bool(ctx.needs_input_grad[i]) for i in tensor_inputs]
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if not compute_stats or grad_stats is None:
        grad_stats = stats = None
    if _transforms.create_graph_required("conv_fused_backward", ctx.backend):  # double backward
        y, stats = _transforms.conv_fused(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                                          residual, out_relu, stride, padding, dilation, groups, compute_stats)
        grads = _transforms.differentiable_vjp([y, stats], [grad_y, grad_stats], [x, weight, bias, in_scale,
                                               in_shift, out_scale, out_shift, residual], needs)
    elif ctx.eager:  # the autograd.Function of eager mode: the backend directly
        grads = _backward_impl((grad_y, grad_stats, x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                                residual, out_relu, stride, padding, dilation, groups, y, needs, stats), ctx.backend)
    else:
        grads = unpack_grads(torch.ops.pe_kernels.conv_fused_backward(
            grad_y, grad_stats, x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
            out_relu, stride, padding, dilation, groups, y, needs, stats, ctx.backend))
    dx, dw, db, d_in_scale, d_in_shift, d_out_scale, d_out_shift, d_residual = grads
    return (dx, dw, db, d_in_scale, d_in_shift, None, d_out_scale, d_out_shift, d_residual, None, None, None,
            None, None, None)


_conv_fused.register_autograd(_backward, setup_context=_setup_context)


class _ConvFusedFunction(torch.autograd.Function):
    """Eager mode's entry (ops/_common.eager_dispatch): the custom op's forward and backward without torch.library's
    dispatch layers."""

    @staticmethod
    def forward(ctx, *args):
        out = eager_context(ctx, _setup_context, args, _forward_impl(args))
        if not args[-1]:
            ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_stats):
        return _backward(ctx, grad_y, grad_stats)


def conv_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, in_scale: Optional[Tensor] = None,
               in_shift: Optional[Tensor] = None, in_relu: bool = False, out_scale: Optional[Tensor] = None,
               out_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None, out_relu: bool = False,
               stride=1, padding=0, dilation=1, groups: int = 1,
               compute_stats: bool = False) -> tuple[Tensor, Tensor]:
    """Checked, autocast-aware entry to `pe_kernels::conv_fused`. Returns (y, stats); see the module docstring."""
    args, plan_key = checked_args_keyed(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                                        out_relu, stride, padding, dilation, groups, compute_stats)
    if _transforms.composite_required("conv_fused"):
        return _transforms.conv_fused(*args)
    tensors = (args.x, args.weight, args.bias, args.in_scale, args.in_shift, args.out_scale, args.out_shift,
               args.residual)
    if eager_dispatch(*tensors):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _ConvFusedFunction.apply(*args)
        return _forward_impl(args, plan_key)
    return torch.ops.pe_kernels.conv_fused(*args)


def checked_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                 in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                 residual: Optional[Tensor], out_relu: bool, stride, padding, dilation, groups: int,
                 compute_stats: bool) -> ConvArgs:
    """conv_fused's arguments checked (ValueError/TypeError naming the values) and cast for autocast: a ConvArgs
    (ops/contract.py) with stride/padding/dilation as [a, b] lists. The checks (metadata only) run once per metadata
    (CheckMemo); the casts every call."""
    return checked_args_keyed(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu,
                              stride, padding, dilation, groups, compute_stats)[0]


def checked_args_keyed(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu, stride,
                       padding, dilation, groups, compute_stats) -> tuple[ConvArgs, Optional[tuple]]:
    """(checked_args' ConvArgs, plan key): the key of the checks' memo with what else fixes the metadata of the
    returned arguments (the autocast dtype, the two ReLU flags), or None where the checks were not memoised."""
    (stride, padding, dilation), key = _CHECKS.run_keyed(_check_conv_args, x, weight, bias, in_scale, in_shift,
                                                         out_scale, out_shift, residual, stride, padding, dilation,
                                                         groups, bool(compute_stats))
    amp = autocast_dtype(x)
    if amp is not None:
        x, weight, bias, residual = [cast_activation(t, amp) for t in (x, weight, bias, residual)]
    if weight.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; cast one of them (or use autocast)")
    bias = cast_vector(bias, x.dtype)
    if in_scale is not None or in_shift is not None or out_scale is not None or out_shift is not None:
        vec_dtype = param_dtype(x.dtype)
        in_scale, in_shift, out_scale, out_shift = [cast_vector(t, vec_dtype)
                                                    for t in (in_scale, in_shift, out_scale, out_shift)]
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    in_relu, out_relu = bool(in_relu), bool(out_relu)
    args = ConvArgs(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu,
                    list(stride), list(padding), list(dilation), groups, bool(compute_stats))
    return args, (None if key is None else (key, amp, in_relu, out_relu))


_CHECKS = CheckMemo()


def _check_conv_args(x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride, padding, dilation,
                     groups, compute_stats) -> tuple[tuple, tuple, tuple]:
    """checked_args' checks (ValueError/TypeError naming the values); returns stride, padding, dilation as pairs."""
    check_4d(x, "x")
    check_4d(weight, "weight")
    check_floating(x, "x")
    check_same_device(weight, "weight", x)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    n, c, h, w = x.shape
    k, c_per_group, r, s = weight.shape
    if min(weight.shape) < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)} (out_channels, in_channels/groups, kernel_h, "
                         "kernel_w): every dimension must be >= 1 (kernel size should be greater than zero)")
    if c != c_per_group * groups:
        raise ValueError(f"x has {c} channels but weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{c_per_group * groups}")
    if k % groups != 0:
        raise ValueError(f"weight has {k} output channels, not divisible by groups={groups}")
    p = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    if p < 1 or q < 1:
        raise ValueError(f"input of size {h}x{w} (padding {padding}) is smaller than the dilated kernel "
                         f"{r}x{s} (dilation {dilation}): output would be {p}x{q}")
    for name, vec, length in (("bias", bias, k), ("in_scale", in_scale, c), ("in_shift", in_shift, c),
                              ("out_scale", out_scale, k), ("out_shift", out_shift, k)):
        check_vector(vec, name, length, x)
    if residual is not None:
        check_4d(residual, "residual")
        check_same_device(residual, "residual", x)
        if tuple(residual.shape) != (n, k, p, q):
            raise ValueError(f"residual has shape {tuple(residual.shape)}, the output is {(n, k, p, q)}")
    if compute_stats and n * p * q < 1:
        raise ValueError("statistics need at least one output position")
    return tuple(stride), tuple(padding), tuple(dilation)
