"""`conv_bn_act`: a training conv -> BatchNorm2d (batch statistics) -> (+ residual) -> act layer as ONE autograd node.

    y, scale, shift = conv_bn_train(x, weight, ...)                 (BN(conv(x)) = y * scale + shift)
    out             = bn_apply(y, scale, shift, residual, residual_scale, residual_shift, relu)
                    = act(y * scale + shift + residual * residual_scale + residual_shift)

The same backend calls as the two ops one after the other (conv_bn_train, then bn_apply; their backwards in reverse
order: bn_apply_backward's d_y, d_scale, d_shift feed conv_bn_train_backward), so the same results bit for bit, and
the same launches: what it saves is host time — one autograd node instead of two (a Python autograd.Function costs
~10-20 us to apply and as much to run backward), one op entry instead of two, and (y, scale, shift) never leave the
node. Each half dispatches as its op does (`select` on conv_fused and on bn_apply, in the forward and the backward:
the same backends, the same `last_dispatch()` records).

Eager mode with autograd only (the op mutates the running statistics and carries a gradient: an autograd.Function).
Without a gradient, under torch.compile / export, a TorchDispatchMode, a tensor subclass or a torch.func transform it
is the composition ops.conv_bn_train + ops.bn_apply itself; a double backward recomputes the composition
differentiably (the `auto` / `torch` backends; a forced kernel backend raises, as the two ops do).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _transforms, conv_bn_train as _cbt
from ._common import CheckMemo, eager_dispatch, no_autocast
from .bn_apply import bn_apply, cast_residual, check_residual

Tensor = torch.Tensor

_CHECKS = CheckMemo()  # check_residual, once per metadata
_INPUTS = 10  # x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale, residual_shift


def _apply_impl(args: tuple, plan_key: Optional[tuple], relu_bits: bool = False):
    """backend.bn_apply(*args); through its bn_apply_keyed where it has one and a key is given. With relu_bits:
    (out, its ReLU mask as bits or None), the bits from the backend's optional bn_apply_relu_bits where it has one
    (relu only)."""
    y = args[0]
    backend, _ = _backend.select("bn_apply", y.device, y.dtype, args=args)
    with no_autocast(y.device):
        if relu_bits:
            with_bits = getattr(backend, "bn_apply_relu_bits", None) if args[6] else None
            if with_bits is not None:
                return with_bits(*args[:6])
            return _apply_impl(args, plan_key), None
        keyed = None if plan_key is None else getattr(backend, "bn_apply_keyed", None)
        if keyed is not None:
            return keyed(plan_key, *args)
        return backend.bn_apply(*args)


class _ConvBnActFunction(torch.autograd.Function):
    """forward(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale, residual_shift,
    config, relu, apply_key) -> out; config: conv_bn_train's (ops/conv_bn_train.prepare); apply_key: what fixes the
    apply's inputs but y, scale and shift (conv_bn_act), or None; the forward adds the name of the backend that made
    those (their metadata is that backend's). The backward keys nothing: its inputs are saved tensors, which a
    saved-tensor hook (torch.autograd.graph.save_on_cpu, ...) may hand back in another layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale,
                residual_shift, config, relu, apply_key):
        y, stats, scale, shift, conv_on, xp = _cbt.forward_impl(x, weight, bias, in_scale, in_shift, bn_weight,
                                                                bn_bias, config, x_prime=ctx.needs_input_grad[1])
        if apply_key is not None:
            apply_key = (apply_key, conv_on)
        out = _apply_impl((y, scale, shift, residual, residual_scale, residual_shift, relu), apply_key)
        ctx.save_for_backward(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale,
                              residual_shift, y, stats, scale, shift, out, xp)
        ctx.config = config[:6]
        ctx.relu = relu
        ctx.backend = _backend.requested_backend()  # governs the backward, whatever thread autograd runs it on
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale, residual_shift, y, stats,
         scale, shift, out, xp) = ctx.saved_tensors
        inputs = (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale, residual_shift)
        needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in enumerate(inputs)]
        grads: list[Optional[Tensor]] = [None] * _INPUTS
        if grad_out is None:
            return (*grads, None, None, None)
        if _transforms.create_graph_required("bn_apply_backward", ctx.backend):  # double backward
            in_relu, stride, padding, dilation, groups, eps = ctx.config
            y2, stats2 = _transforms.conv_fused(x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False,
                                                stride, padding, dilation, groups, True)
            count = y.shape[0] * y.shape[2] * y.shape[3]
            scale2, shift2 = _transforms.bn_finalize(stats2, count, bn_weight, bn_bias, eps)
            out2 = _transforms.bn_apply(y2, scale2, shift2, residual, residual_scale, residual_shift, ctx.relu)
            return (*_transforms.differentiable_vjp([out2], [grad_out], list(inputs), needs), None, None, None)
        inner = any(needs[:7])  # y, scale and shift carry the gradient of every conv / BN input
        apply_args = (grad_out, y, scale, shift, residual, residual_scale, residual_shift, ctx.relu, out,
                      [inner, inner, inner, needs[7], needs[8], needs[9]])
        module, _ = _backend.select("bn_apply_backward", y.device, y.dtype, requested=ctx.backend, args=apply_args)
        with no_autocast(y.device):
            d_y, d_scale, d_shift, d_res, d_rscale, d_rshift = module.bn_apply_backward(*apply_args)
        grads[7:] = d_res, d_rscale, d_rshift
        if inner:
            grads[:7] = _cbt.backward_grads(d_y, d_scale, d_shift, inputs[:7], y, stats, ctx.config, ctx.backend,
                                            needs[:7], xp)
        return (*grads, None, None, None)


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, in_scale: Optional[Tensor] = None,
                in_shift: Optional[Tensor] = None, in_relu: bool = False, stride=1, padding=0, dilation=1,
                groups: int = 1, bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                eps: float = 1e-5, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                num_batches_tracked: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
                residual: Optional[Tensor] = None, residual_scale: Optional[Tensor] = None,
                residual_shift: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """act(BN(conv(x)) + residual * residual_scale + residual_shift) for a training batch, BN from the batch
    statistics (running statistics and num_batches_tracked updated as BatchNorm2d does); the arguments are
    ops.conv_bn_train's then ops.bn_apply's (module docstring). Needs N*P*Q >= 2."""
    tensors, config, y_shape, fused = _cbt.prepare(x, weight, bias, in_scale, in_shift, in_relu, stride, padding,
                                                 dilation, groups, bn_weight, bn_bias, eps, running_mean, running_var,
                                                 num_batches_tracked, momentum)
    residual_key: Optional[tuple] = ()  # (none: nothing to check)
    if residual is not None or residual_scale is not None or residual_shift is not None:
        _, residual_key = _CHECKS.run_keyed(check_residual, tensors[0], y_shape, residual, residual_scale,
                                            residual_shift)
        residual, residual_scale, residual_shift = cast_residual(tensors[0], residual, residual_scale, residual_shift)
    extra = (residual, residual_scale, residual_shift)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, *extra))
    if not (fused and grad and eager_dispatch(*extra)):  # the two ops
        y, scale, shift = _cbt.run_prepared(tensors, config, y_shape, fused)
        return bn_apply(y, scale, shift, residual, residual_scale, residual_shift, relu)
    # what fixes the apply's arguments (a backend's *_keyed launch plans): the conv's plan key (y, scale, shift; the
    # forward adds the name of the backend that ran the conv), the residual's check key, the flag
    apply_key = None if config[10] is None or residual_key is None else (config[10], residual_key, bool(relu))
    return _ConvBnActFunction.apply(*tensors, *extra, config, bool(relu), apply_key)
