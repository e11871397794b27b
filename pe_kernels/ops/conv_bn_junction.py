"""`conv_bn_junction`: where one residual block ends and the next begins, as ONE autograd node — the tail of a block
(its last conv -> BatchNorm2d (batch statistics) -> + residual -> act: ops.conv_bn_act) and the first conv -> BN of
the next block (ops.conv_bn_train), which reads the tail's output:

    out                   = conv_bn_act(x, weight, bias, ..., residual, residual_scale, residual_shift, relu)
    y_h, scale_h, shift_h = conv_bn_train(out, head_weight, head_bias, ...)
    returned: (out, y_h, scale_h, shift_h)      (`out` also feeds the next block's residual or shortcut)

The residual may be a shortcut conv -> BN (batch statistics) of the block's input, inside the node too:
(residual, residual_scale, residual_shift) = conv_bn_train(shortcut_x, shortcut_weight, ...), so that its backward
reads the tail's g scaled on load as the tail conv's does (no d_residual is stored).

Forward: the backend calls of the two ops, one after the other (the same results and running statistics bit for
bit). Backward, with grad_out the gradient of `out` from its other consumers (the next block's residual or
shortcut; None when it has none):

    d_out = dx_h + grad_out                       (dx_h: the head's conv_bn_train backward)
    g     = where(out <= 0, 0, d_out)             (relu)
    d_scale = sum g*y,  d_shift = sum g,  d_y = g * scale,  d_residual = g * residual_scale (or g),
    d_residual_scale = sum g*residual,  d_residual_shift = sum g
    then conv_bn_train's backward of the tail conv from (d_y, d_scale, d_shift) (and of the shortcut conv from
    (d_residual, d_residual_scale, d_residual_shift)).

A backend with `conv_bn_junction_backward` (triton) runs it as the two GEMM pairs alone: the head's dgrad epilogue
adds grad_out, applies the mask, sums d_scale, d_shift (d_residual_scale) and stores g once; the tail conv's wgrad
and dgrad read g and multiply by `scale` on load. What it saves per junction against the two nodes: d_out's store
and re-read, the ATen add of grad_out, the apply backward's pass over grad_out, out, y (and its d_y and d_residual
stores: for an identity residual d_residual is g itself); four launches fewer. Other backends compose their own
ops (contract.composed_conv_bn_junction_backward), the same math. The node runs on one backend, the one the head
conv's backward gets (under `auto`: its measured or default choice).

Eager mode with autograd only (the ops mutate running statistics and carry gradients: an autograd.Function).
Without a gradient, under torch.compile / export, a TorchDispatchMode, a tensor subclass or a torch.func transform it
is conv_bn_act then conv_bn_train themselves; a double backward recomputes the composition differentiably.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import _transforms, conv_bn_train as _cbt
from ._common import CheckMemo, autocast_dtype, cast_activation, cast_vector, eager_dispatch, no_autocast
from .contract import JUNCTION_GRAD_NAMES, JunctionSaved, composed_conv_bn_junction_backward, param_dtype
from .bn_apply import cast_residual, check_residual
from .conv_bn_act import _apply_impl, conv_bn_act

Tensor = torch.Tensor

_CHECKS = CheckMemo()  # check_residual, once per metadata
_INPUTS = len(JUNCTION_GRAD_NAMES)  # the Function's tensor inputs, in that order


def _head_prepare(out: Tensor, head: tuple) -> tuple:
    """conv_bn_train's prepare for the head conv on the tail's output (its checks; casts of the BN vectors)."""
    weight, bias, stride, padding, dilation, groups, bn_weight, bn_bias, eps, rm, rv, nbt, momentum = head
    return _cbt.prepare(out, weight, bias, None, None, False, stride, padding, dilation, groups, bn_weight, bn_bias,
                        eps, rm, rv, nbt, momentum)


class _ConvBnJunctionFunction(torch.autograd.Function):
    """forward(*tensors in JUNCTION_GRAD_NAMES' order, config, relu, apply_key, head, shortcut_config) -> (out, y_h,
    scale_h, shift_h); config / shortcut_config: the tail's / shortcut's conv_bn_train config
    (ops/conv_bn_train.prepare; shortcut_config None without a shortcut); head: the head conv's arguments
    (conv_bn_junction); apply_key as in ops/conv_bn_act."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale,
                residual_shift, head_weight, head_bias, head_bn_weight, head_bn_bias, sc_x, sc_weight, sc_bias,
                sc_bn_weight, sc_bn_bias, config, relu, apply_key, head, sc_config):
        y, stats, scale, shift, conv_on = _cbt.forward_impl(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias,
                                                            config)
        stats_s = None
        if sc_config is not None:  # the residual: the shortcut's conv -> BN
            residual, stats_s, residual_scale, residual_shift, _ = _cbt.forward_impl(
                sc_x, sc_weight, sc_bias, None, None, sc_bn_weight, sc_bn_bias, sc_config)
        if apply_key is not None:
            apply_key = (apply_key, conv_on)
        out, bits = _apply_impl((y, scale, shift, residual, residual_scale, residual_shift, relu), apply_key, True)
        head = (head_weight, head_bias, *head[2:6], head_bn_weight, head_bn_bias, *head[8:])
        h_tensors, h_config, _, _ = _head_prepare(out, head)
        y_h, stats_h, scale_h, shift_h, _ = _cbt.forward_impl(*h_tensors, h_config)
        # (the head's tensors were cast by conv_bn_junction: prepare's casts are no-ops, h_tensors hold the inputs)
        ctx.save_for_backward(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale,
                              residual_shift, y, stats, scale, shift, out, *h_tensors[1:3], *h_tensors[5:7], y_h,
                              stats_h, sc_x, sc_weight, sc_bias, sc_bn_weight, sc_bn_bias, stats_s, bits)
        ctx.configs = (config[:6], h_config[:6], None if sc_config is None else sc_config[:6])
        ctx.relu = relu
        ctx.backend = _backend.requested_backend()  # governs the backward, whatever thread autograd runs it on
        ctx.set_materialize_grads(False)
        return out, y_h, scale_h, shift_h

    @staticmethod
    def backward(ctx, grad_out, grad_y_h, grad_scale_h, grad_shift_h):
        saved = JunctionSaved(*ctx.saved_tensors, *ctx.configs, ctx.relu)
        inputs = saved.inputs()
        needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in enumerate(inputs)]
        nones = (None,) * 5
        grads_out = (grad_out, grad_y_h, grad_scale_h, grad_shift_h)
        if all(g is None for g in grads_out):
            return (None,) * _INPUTS + nones
        if _transforms.create_graph_required("conv_bn_junction_backward", ctx.backend):  # double backward
            return (*_double_backward(saved, inputs, grads_out, needs), *nones)
        # One backend for the node: the one the head conv's backward gets (a request: the same for all its ops)
        head_args = (grad_y_h, saved.stats_h, saved.out, saved.head_weight, saved.head_bias, None, None, False, None,
                     None, None, False, *saved.head_config[1:5], saved.y_h,
                     [True, *needs[10:12], False, False, False, False, False], saved.stats_h)
        module, _ = _backend.select("conv_fused_backward", saved.out.device, saved.out.dtype, requested=ctx.backend,
                                    args=head_args)
        with no_autocast(saved.out.device):
            fused = getattr(module, "conv_bn_junction_backward", None)
            if fused is not None:
                grads = fused(*grads_out, saved, needs)
            else:
                grads = composed_conv_bn_junction_backward(module, *grads_out, saved, needs)
        return (*grads, *nones)


def _double_backward(saved: JunctionSaved, inputs: tuple, grads_out: tuple, needs: list) -> list[Optional[Tensor]]:
    """The composition recomputed as differentiable ATen ops (create_graph=True)."""
    (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, rs, rb, h_weight, h_bias, h_bnw, h_bnb, sc_x,
     sc_weight, sc_bias, sc_bnw, sc_bnb) = inputs

    def conv_bn(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, config):
        in_relu, stride, padding, dilation, groups, eps = config
        y2, stats2 = _transforms.conv_fused(x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False,
                                            stride, padding, dilation, groups, True)
        return (y2, *_transforms.bn_finalize(stats2, y2.shape[0] * y2.shape[2] * y2.shape[3], bn_weight, bn_bias,
                                             config[5]))

    y2, scale2, shift2 = conv_bn(x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, saved.config)
    if saved.shortcut_config is not None:
        residual, rs, rb = conv_bn(sc_x, sc_weight, sc_bias, None, None, sc_bnw, sc_bnb, saved.shortcut_config)
    out2 = _transforms.bn_apply(y2, scale2, shift2, residual, rs, rb, saved.relu)
    head = conv_bn(out2, h_weight, h_bias, None, None, h_bnw, h_bnb, saved.head_config)
    return _transforms.differentiable_vjp([out2, *head], list(grads_out), list(inputs), needs)


def conv_bn_junction(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                     in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = False,
                     stride=1, padding=0, dilation=1, groups: int = 1, bn_weight: Optional[Tensor] = None,
                     bn_bias: Optional[Tensor] = None, eps: float = 1e-5, running_mean: Optional[Tensor] = None,
                     running_var: Optional[Tensor] = None, num_batches_tracked: Optional[Tensor] = None,
                     momentum: Optional[float] = 0.1, residual: Optional[Tensor] = None,
                     residual_scale: Optional[Tensor] = None, residual_shift: Optional[Tensor] = None,
                     relu: bool = False, head_weight: Tensor, head_bias: Optional[Tensor] = None, head_stride=1,
                     head_padding=0, head_dilation=1, head_groups: int = 1,
                     head_bn_weight: Optional[Tensor] = None, head_bn_bias: Optional[Tensor] = None,
                     head_eps: float = 1e-5, head_running_mean: Optional[Tensor] = None,
                     head_running_var: Optional[Tensor] = None, head_num_batches_tracked: Optional[Tensor] = None,
                     head_momentum: Optional[float] = 0.1, shortcut_x: Optional[Tensor] = None,
                     shortcut_weight: Optional[Tensor] = None, shortcut_bias: Optional[Tensor] = None,
                     shortcut_stride=1, shortcut_padding=0, shortcut_dilation=1, shortcut_groups: int = 1,
                     shortcut_bn_weight: Optional[Tensor] = None, shortcut_bn_bias: Optional[Tensor] = None,
                     shortcut_eps: float = 1e-5, shortcut_running_mean: Optional[Tensor] = None,
                     shortcut_running_var: Optional[Tensor] = None,
                     shortcut_num_batches_tracked: Optional[Tensor] = None,
                     shortcut_momentum: Optional[float] = 0.1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, y_h, scale_h, shift_h): out = ops.conv_bn_act(x, weight, ..., relu) and (y_h, scale_h, shift_h) =
    ops.conv_bn_train(out, head_weight, ...) (the head_* arguments are conv_bn_train's, without a prologue), as one
    autograd node (module docstring). With shortcut_x / shortcut_weight (and the other shortcut_* arguments, those of
    conv_bn_train), the residual is that conv -> BN: (residual, residual_scale, residual_shift) =
    ops.conv_bn_train(shortcut_x, shortcut_weight, ...) (then no residual* argument may be given). Running statistics
    are updated as the ops do. Every BN needs N*P*Q >= 2."""
    head = (head_weight, head_bias, head_stride, head_padding, head_dilation, head_groups, head_bn_weight,
            head_bn_bias, head_eps, head_running_mean, head_running_var, head_num_batches_tracked, head_momentum)
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError("shortcut_x and shortcut_weight go together (the residual's conv -> BN)")
    shortcut = None
    if shortcut_x is not None:
        if residual is not None or residual_scale is not None or residual_shift is not None:
            raise ValueError("a shortcut conv gives the residual: residual, residual_scale and residual_shift must "
                             "not be given with it")
        shortcut = _cbt.prepare(shortcut_x, shortcut_weight, shortcut_bias, None, None, False, shortcut_stride,
                                shortcut_padding, shortcut_dilation, shortcut_groups, shortcut_bn_weight,
                                shortcut_bn_bias, shortcut_eps, shortcut_running_mean, shortcut_running_var,
                                shortcut_num_batches_tracked, shortcut_momentum)
    tensors, config, y_shape, fused = _cbt.prepare(x, weight, bias, in_scale, in_shift, in_relu, stride, padding,
                                                 dilation, groups, bn_weight, bn_bias, eps, running_mean, running_var,
                                                 num_batches_tracked, momentum)
    residual_key: Optional[tuple] = ()
    if shortcut is not None:
        if tuple(shortcut[2]) != tuple(y_shape):
            raise ValueError(f"the shortcut conv gives shape {tuple(shortcut[2])}, the tail conv {tuple(y_shape)}")
        residual_key = None  # (made in the node: no keyed plan for the apply)
    elif residual is not None or residual_scale is not None or residual_shift is not None:
        _, residual_key = _CHECKS.run_keyed(check_residual, tensors[0], y_shape, residual, residual_scale,
                                            residual_shift)
        residual, residual_scale, residual_shift = cast_residual(tensors[0], residual, residual_scale, residual_shift)
    extra = (residual, residual_scale, residual_shift)
    # The head's casts as its prepare makes them (autocast, the bias in the activations' dtype, the BN vectors in the
    # per-channel dtype), made here, where autograd sees them (a double backward differentiates through them)
    act_dtype = tensors[0].dtype
    amp = autocast_dtype(x)
    head_weight = cast_activation(head_weight, amp)
    head_bias = cast_vector(cast_activation(head_bias, amp), act_dtype)
    head_bn_weight = cast_vector(head_bn_weight, param_dtype(act_dtype))
    head_bn_bias = cast_vector(head_bn_bias, param_dtype(act_dtype))
    head = (head_weight, head_bias, *head[2:6], head_bn_weight, head_bn_bias, *head[8:])
    head_tensors = (head_weight, head_bias, head_bn_weight, head_bn_bias)
    sc_tensors = (None,) * 5 if shortcut is None else (*shortcut[0][:3], *shortcut[0][5:7])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (*tensors, *extra, *head_tensors, *sc_tensors))
    if not (fused and grad and eager_dispatch(*extra, *head_tensors, *sc_tensors)
            and (shortcut is None or shortcut[3])):  # the ops one after the other
        if shortcut is not None:
            residual, residual_scale, residual_shift = _cbt.run_prepared(*shortcut)
        out = conv_bn_act(x, weight, bias, in_scale=in_scale, in_shift=in_shift, in_relu=in_relu, stride=stride,
                          padding=padding, dilation=dilation, groups=groups, bn_weight=bn_weight, bn_bias=bn_bias,
                          eps=eps, running_mean=running_mean, running_var=running_var,
                          num_batches_tracked=num_batches_tracked, momentum=momentum, residual=residual,
                          residual_scale=residual_scale, residual_shift=residual_shift, relu=relu)
        y_h, scale_h, shift_h = _cbt.run_prepared(*_head_prepare(out, head))
        return out, y_h, scale_h, shift_h
    apply_key = None if config[10] is None or residual_key is None else (config[10], residual_key, bool(relu))
    return _ConvBnJunctionFunction.apply(*tensors, *extra, *head_tensors, *sc_tensors, config, bool(relu), apply_key,
                                         head, None if shortcut is None else shortcut[1])
