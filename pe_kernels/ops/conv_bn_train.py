"""`conv_bn_train`: a training conv -> BatchNorm2d batch as one autograd node (one forward call, one backward call
to the backend), so that a kernel backend can fuse the BN finalize into the conv and its backward into the conv's
backward.

    y, stats     = conv_fused(x', w) + bias, with statistics, no epilogue      (x' = act_in(x*in_scale + in_shift))
    scale, shift = bn_train_finalize(stats, n = N*P*Q, bn_weight, bn_bias, eps, running_mean, running_var,
                                     num_batches_tracked, momentum)             (running stats, nbt updated in place)
    BN(conv(x)) = y * scale + shift        returned: (y, scale, shift)

Backward, with (d_mean, d_m2) = bn_finalize_backward(grad_scale, grad_shift) (ops/bn_finalize.py):
    g_acc = grad_y + d_mean / n + 2 d_m2 (y - mean),  then conv_fused's backward of g_acc (dx, dw, d_bias, prologue)
    d_bn_weight = (grad_scale - mean grad_shift) invstd,  d_bn_bias = grad_shift.
The triton backend runs the forward as one launch (the conv's last programs finalize) and the backward as two
(wgrad and dgrad form g_acc on load); other backends compose their conv_fused and bn_train_finalize
(ops/contract.composed_conv_bn_train).

Eager mode only (an autograd.Function: the op mutates the running statistics and carries a gradient, which one
torch.library custom op cannot). Under torch.compile / export, a TorchDispatchMode, a tensor subclass or a
torch.func transform it is the composition ops.conv_fused (the registered op) + ops.bn_train_finalize (its ATen
bookkeeping + the registered bn_finalize): the same math;
a double backward recomputes the composition differentiably. Autocast: as conv_fused (x, weight, bias in the
autocast dtype; BN vectors and statistics fp32).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _transforms
from ._common import CheckMemo, eager_dispatch, mark_written, no_autocast
from .bn_finalize import bn_train_finalize, check_train_args
from .contract import X_PRIME, param_dtype
from .conv_fused import checked_args_keyed, conv_fused, conv_output_size

Tensor = torch.Tensor

_CHECKS = CheckMemo()  # check_train_args, once per metadata
_CONV_INPUTS = 5  # x, weight, bias, in_scale, in_shift: the conv's differentiable inputs, then bn_weight, bn_bias


def forward_impl(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, config,
                 x_prime: Optional[bool] = None) -> tuple:
    """backend.conv_bn_train on the backend conv_fused would run (the op the dispatch table and autotune know);
    through its conv_bn_train_keyed where it has one and `prepare` made a plan key (config[10]). Returns
    (y, stats, scale, shift, the backend's name): a plan key downstream of these outputs names the backend that
    made them (their metadata is that backend's). `x_prime` given (the autograd nodes, for their backward): a
    sixth result, x' = act(x * in_scale + in_shift) as the backend's launch stored it where x_prime is true and the
    backend stores one (contract.X_PRIME), else None."""
    in_relu, stride, padding, dilation, groups, eps, running_mean, running_var, nbt, momentum, plan_key = config
    conv_args = (x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False, stride, padding, dilation,
                 groups, True)
    backend, choice = _backend.select("conv_fused", x.device, x.dtype, args=conv_args)
    saving = bool(x_prime) and getattr(backend, X_PRIME, False)
    extra = {"x_prime": True} if saving else {}
    with no_autocast(x.device):
        keyed = None if plan_key is None else getattr(backend, "conv_bn_train_keyed", None)
        if keyed is not None:
            out = keyed(plan_key, x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
                        bn_weight, bn_bias, eps, running_mean, running_var, nbt, momentum, **extra)
        else:
            out = backend.conv_bn_train(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation,
                                        groups, bn_weight, bn_bias, eps, running_mean, running_var, nbt, momentum,
                                        **extra)
    mark_written(running_mean, running_var, nbt)  # written by the kernel: versions as an in-place ATen op's
    if x_prime is None:
        return (*out, choice.backend)
    return (*out[:4], choice.backend, out[4] if saving else None)


class _ConvBnTrainFunction(torch.autograd.Function):
    """forward(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, config) -> (y, scale, shift); config =
    (in_relu, stride, padding, dilation, groups, eps, running_mean, running_var, num_batches_tracked, momentum,
    plan_key) (prepare)."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, config):
        y, stats, scale, shift, _, xp = forward_impl(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, config,
                                                     x_prime=ctx.needs_input_grad[1])
        in_relu, stride, padding, dilation, groups, eps = config[:6]
        ctx.save_for_backward(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, y, stats, xp)
        ctx.config = (in_relu, stride, padding, dilation, groups, eps)
        ctx.backend = _backend.requested_backend()  # governs the backward, whatever thread autograd runs it on
        ctx.set_materialize_grads(False)
        return y, scale, shift

    @staticmethod
    def backward(ctx, grad_y, grad_scale, grad_shift):
        x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, y, stats, xp = ctx.saved_tensors
        inputs = (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias)
        needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in enumerate(inputs)]
        return (*backward_grads(grad_y, grad_scale, grad_shift, inputs, y, stats, ctx.config, ctx.backend, needs,
                                xp), None)


def backward_grads(grad_y, grad_scale, grad_shift, inputs: tuple, y: Tensor, stats: Tensor, config: tuple,
                   backend: str, needs: list, x_prime: Optional[Tensor] = None) -> list:
    """conv_bn_train's gradients (CONV_BN_GRAD_NAMES) of `inputs` = (x, weight, bias, in_scale, in_shift,
    bn_weight, bn_bias), from the forward's y and stats; config = (in_relu, stride, padding, dilation, groups,
    eps); `backend`: the request recorded by the forward; `x_prime`: the x' forward_impl returned (or None), passed
    to a backend that reads it (contract.X_PRIME). Double backward: the composition recomputed differentiably. (No
    plan key: the inputs are saved tensors, whose layout a saved-tensor hook may change.)"""
    x, weight, bias, in_scale, in_shift, bn_weight, bn_bias = inputs
    in_relu, stride, padding, dilation, groups, eps = config
    if _transforms.create_graph_required("conv_fused_backward", backend):  # double backward
        y2, stats2 = _transforms.conv_fused(x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False,
                                            stride, padding, dilation, groups, True)
        count = y.shape[0] * y.shape[2] * y.shape[3]
        scale2, shift2 = _transforms.bn_finalize(stats2, count, bn_weight, bn_bias, eps)
        return _transforms.differentiable_vjp([y2, scale2, shift2], [grad_y, grad_scale, grad_shift], list(inputs),
                                              needs)
    # The backend conv_fused_backward would run (autotune measures that op on these arguments: `stats` stands in
    # for grad_stats, whose (2, K) gradient the composed backward would pass).
    args = (grad_y, stats, x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False, stride, padding,
            dilation, groups, y, needs[:_CONV_INPUTS] + [False] * 3, stats)
    module, _ = _backend.select("conv_fused_backward", x.device, x.dtype, requested=backend, args=args)
    extra = {"x_prime": x_prime} if x_prime is not None and getattr(module, X_PRIME, False) else {}
    with no_autocast(x.device):
        return module.conv_bn_train_backward(grad_y, grad_scale, grad_shift, x, weight, bias, in_scale, in_shift,
                                             in_relu, stride, padding, dilation, groups, y, stats, bn_weight, eps,
                                             needs, **extra)


def conv_bn_train(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, in_scale: Optional[Tensor] = None,
                  in_shift: Optional[Tensor] = None, in_relu: bool = False, stride=1, padding=0, dilation=1,
                  groups: int = 1, bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                  eps: float = 1e-5, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  num_batches_tracked: Optional[Tensor] = None,
                  momentum: Optional[float] = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """(y, scale, shift) with BN(conv(x)) = y * scale + shift for a training batch (module docstring); the running
    statistics and num_batches_tracked are updated as BatchNorm2d does (no host sync). Needs N*P*Q >= 2."""
    tensors, config, y_shape, fused = prepare(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation,
                                            groups, bn_weight, bn_bias, eps, running_mean, running_var,
                                            num_batches_tracked, momentum)
    return run_prepared(tensors, config, y_shape, fused)


def run_prepared(tensors: tuple, config: tuple, y_shape: tuple, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """conv_bn_train on `prepare`'s results: the composition, the autograd.Function, or (no gradient) the backend."""
    if not fused:
        return composed(tensors, config, y_shape)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ConvBnTrainFunction.apply(*tensors, config)
    y, _, scale, shift, _ = forward_impl(*tensors, config)
    return y, scale, shift


def prepare(x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation, groups, bn_weight, bn_bias, eps,
            running_mean, running_var, num_batches_tracked, momentum) -> tuple[tuple, tuple, int, bool]:
    """conv_bn_train's arguments checked and cast (autocast; BN vectors in the per-channel dtype): (tensors, config,
    y_shape, fused) with tensors = (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias), config as
    _ConvBnTrainFunction takes it, y_shape = the conv's (N, K, P, Q), and fused = whether the backend's
    conv_bn_train may run (eager mode: else the composition of the registered ops, `composed`)."""
    args, conv_key = checked_args_keyed(x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False,
                                        stride, padding, dilation, groups, True)
    x, weight, bias, in_scale, in_shift = args.x, args.weight, args.bias, args.in_scale, args.in_shift
    in_relu, stride, padding, dilation, groups = args.in_relu, args.stride, args.padding, args.dilation, args.groups
    k = weight.shape[0]
    y_shape = output_shape(x, weight, stride, padding, dilation)
    count = y_shape[0] * y_shape[2] * y_shape[3]
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} (N*P*Q) for input "
                         f"size {tuple(x.shape)}")
    if isinstance(eps, Tensor):  # its value is checked (eps > 0): a plain float for the memo's key
        eps = float(eps)
    _, train_key = _CHECKS.run_keyed(check_train_args, k, x, bn_weight, bn_bias, eps, running_mean, running_var,
                                     num_batches_tracked, "bn_")
    momentum = None if momentum is None else float(momentum)
    # what fixes every backend argument's metadata and scalar (a backend's *_keyed launch plans): the conv's key,
    # the BatchNorm's, the momentum
    plan_key = None if conv_key is None or train_key is None else (conv_key, train_key, momentum)
    vec_dtype = param_dtype(x.dtype)
    if bn_weight is not None and bn_weight.dtype != vec_dtype:
        bn_weight = bn_weight.to(vec_dtype)
    if bn_bias is not None and bn_bias.dtype != vec_dtype:
        bn_bias = bn_bias.to(vec_dtype)
    tensors = (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias)
    config = (in_relu, stride, padding, dilation, groups, float(eps), running_mean, running_var, num_batches_tracked,
              momentum, plan_key)
    fused = not _transforms.composite_required("conv_fused") and eager_dispatch(*tensors, running_mean, running_var)
    return tensors, config, y_shape, fused


def composed(tensors: tuple, config: tuple, y_shape: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """conv_bn_train as the registered ops conv_fused + bn_train_finalize (traced, transformed, subclasses)."""
    x, weight, bias, in_scale, in_shift, bn_weight, bn_bias = tensors
    in_relu, stride, padding, dilation, groups, eps, running_mean, running_var, nbt, momentum, _ = config
    y, stats = conv_fused(x, weight, bias, in_scale=in_scale, in_shift=in_shift, in_relu=in_relu, stride=stride,
                          padding=padding, dilation=dilation, groups=groups, compute_stats=True)
    count = y_shape[0] * y_shape[2] * y_shape[3]
    scale, shift = bn_train_finalize(stats, count, bn_weight, bn_bias, eps, running_mean, running_var, nbt, momentum)
    return y, scale, shift


def output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, K, P, Q) of the conv (checked_args has checked that P, Q >= 1)."""
    p = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    q = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.shape[0], weight.shape[0], p, q
