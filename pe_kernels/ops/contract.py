"""The op contract every backend implements (pe_kernels.reference, pe_kernels.triton, pe_kernels.cuda).

A backend is a module with the functions of `Backend` below, each with exactly these arguments and results; the
math of each is written out in pe_kernels/reference.py (the oracle). The backends implement the contract, they do
not define it: gradient orders, the per-channel dtype and the checks shared by the op wrappers live here.
Adding an op: its function here, its schema and autograd in ops/<op>.py, its reference, its kernels in each
backend, its tests against the reference. tests/test_ops.py checks that every backend module matches `Backend`.
This module imports nothing from the package (the backends may import it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor

# Order of the gradients returned by conv_fused_backward.
CONV_GRAD_NAMES = ("x", "weight", "bias", "in_scale", "in_shift", "out_scale", "out_shift", "residual")
# Order of the gradients returned by bn_finalize_backward.
FINALIZE_GRAD_NAMES = ("stats", "weight", "bias")
# Order of the gradients returned by conv_bn_train_backward.
CONV_BN_GRAD_NAMES = ("x", "weight", "bias", "in_scale", "in_shift", "bn_weight", "bn_bias")
# Order of the gradients returned by bn_apply_backward.
APPLY_GRAD_NAMES = ("y", "scale", "shift", "residual", "residual_scale", "residual_shift")
# Order of the gradients returned by conv_bn_junction_backward (ops/conv_bn_junction.py).
JUNCTION_GRAD_NAMES = ("x", "weight", "bias", "in_scale", "in_shift", "bn_weight", "bn_bias", "residual",
                       "residual_scale", "residual_shift", "head_weight", "head_bias", "head_bn_weight",
                       "head_bn_bias", "shortcut_x", "shortcut_weight", "shortcut_bias", "shortcut_bn_weight",
                       "shortcut_bn_bias")


class ConvArgs(NamedTuple):
    """A conv call described once: conv_fused's arguments by name, in the contract's order (Backend.conv_fused's
    parameters; tests/test_ops.py holds them equal). The ops build one (ops/conv_fused: checked, cast, stride /
    padding / dilation as [a, b] lists) and hand it on whole: backend.conv_fused(*args), the registered op, autotune.
    Geometry: stride, padding, dilation, groups; prologue: in_scale, in_shift, in_relu (x' = act(x * in_scale +
    in_shift)); epilogue: bias, out_scale, out_shift, residual, out_relu, compute_stats."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    in_scale: Optional[Tensor]
    in_shift: Optional[Tensor]
    in_relu: bool
    out_scale: Optional[Tensor]
    out_shift: Optional[Tensor]
    residual: Optional[Tensor]
    out_relu: bool
    stride: list
    padding: list
    dilation: list
    groups: int
    compute_stats: bool


def param_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """dtype of per-channel vectors and statistics: fp64 for fp64 activations, fp32 otherwise."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


def grad_like_weight(dw: Tensor, weight: Tensor) -> Tensor:
    """The weight gradient as the contract returns it: in the weight's dtype and strides (a channels_last weight gets
    a channels_last gradient, so that autograd's AccumulateGrad needs no copy); no copy when it already is."""
    if dw.dtype == weight.dtype and dw.stride() == weight.stride():
        return dw
    return torch.empty_like(weight).copy_(dw)


def check_backward_stats(grad_stats: Optional[Tensor], stats: Optional[Tensor], channels: int) -> None:
    """conv_fused_backward needs the forward's (2, K) statistics whenever a gradient of them is given."""
    if grad_stats is None:
        return
    if stats is None or stats.numel() == 0:
        raise ValueError("conv_fused_backward: grad_stats is given but the forward's stats are missing "
                         "(pass the (2, K) [mean, m2] that conv_fused returned as `stats`)")
    if tuple(stats.shape) != (2, channels) or tuple(grad_stats.shape) != (2, channels):
        raise ValueError(f"conv_fused_backward: stats {tuple(stats.shape)} and grad_stats "
                         f"{tuple(grad_stats.shape)} must both be (2, {channels})")


class Backend(Protocol):
    """The functions of a backend module (signatures only; the math: pe_kernels/reference.py)."""

    def conv_fused(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                   in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor],
                   out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int,
                   compute_stats: bool) -> tuple[Tensor, Tensor]: ...

    def conv_fused_backward(self, grad_y: Tensor, grad_stats: Optional[Tensor], x: Tensor, weight: Tensor,
                            bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                            in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                            residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int], groups: int, y: Tensor,
                            needs_grad: Sequence[bool], stats: Optional[Tensor] = None) -> list[Optional[Tensor]]: ...

    def bn_finalize(self, stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> tuple[Tensor, Tensor]: ...

    def bn_running_update(self, stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                          momentum: float) -> None: ...

    def bn_train_finalize(self, stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor],
                          momentum: Optional[float]) -> tuple[Tensor, Tensor]: ...

    def bn_finalize_backward(self, grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], stats: Tensor,
                             count: int, weight: Optional[Tensor], eps: float,
                             needs_grad: Sequence[bool]) -> list[Optional[Tensor]]: ...

    def conv_bn_train(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                      in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor],
                      momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def conv_bn_train_backward(self, grad_y: Optional[Tensor], grad_scale: Optional[Tensor],
                               grad_shift: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
                               in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
                               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                               y: Tensor, stats: Tensor, bn_weight: Optional[Tensor], eps: float,
                               needs_grad: Sequence[bool]) -> list[Optional[Tensor]]: ...

    def bn_apply(self, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor: ...

    def bn_apply_backward(self, grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                          residual: Optional[Tensor], residual_scale: Optional[Tensor],
                          residual_shift: Optional[Tensor], relu: bool, out: Tensor,
                          needs_grad: Sequence[bool]) -> list[Optional[Tensor]]: ...


BACKEND_FUNCTIONS = tuple(name for name in Backend.__dict__ if not name.startswith("_"))

# Optional, for a backend whose launchers memoise a plan per argument metadata (pe_kernels.triton): <op>_keyed(op_key,
# *<op>'s arguments) -> <op>'s results, the same as <op>'s. The ops pass the key their checks were memoised under,
# with what else fixes every argument's metadata and scalars (autocast dtype, flags, momentum, the backend that made
# an input), so the backend keys its plan on it instead of building a key of its own. None of it changes what runs;
# a backend without them gets the plain calls. Forward calls only: a backward's inputs are saved tensors, whose
# layout a saved-tensor hook may change (torch.autograd.graph.save_on_cpu), so its launchers key them themselves.
OPTIONAL_BACKEND_FUNCTIONS = ("conv_fused_keyed", "conv_bn_train_keyed", "bn_apply_keyed")

# Optional fused backwards: a backend may implement one with composed_<name>'s arguments and results (below); a
# backend without it gets the composition of its own functions.
OPTIONAL_FUSED_BACKWARDS = ("conv_bn_junction_backward",)
# Optional: bn_apply_relu_bits(y, scale, shift, residual, residual_scale, residual_shift) -> (bn_apply(..., relu=True),
# its ReLU mask as bits, a layout of the backend's own), for that backend's fused backward (the junction's forward).
OPTIONAL_FORWARD_EXTRAS = ("bn_apply_relu_bits",)
# Optional: a backend with X_PRIME = True takes x_prime=True in conv_bn_train (and conv_bn_train_keyed), which then
# returns a fifth result, x' = act(x * in_scale + in_shift) in x's dtype as its launch formed it, or None where it
# stores none, and x_prime=that tensor in conv_bn_train_backward (its wgrad then reads x' instead of forming it):
# the autograd node saves it for its backward (ops/conv_bn_train.forward_impl).
X_PRIME = "X_PRIME"


def composed_conv_bn_train(backend, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                           in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], groups: int, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], eps: float, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                           momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """conv_bn_train from `backend`'s conv_fused (statistics, no epilogue) and bn_train_finalize: what it means,
    and how a backend without a fused kernel implements it.
        y, stats = conv_fused(x, weight, bias, in_scale, in_shift, in_relu, -, -, -, False, ..., compute_stats=True)
        scale, shift = bn_train_finalize(stats, N*P*Q, bn_weight, bn_bias, eps, running_mean, running_var,
                                         num_batches_tracked, momentum)
    Returns (y, stats, scale, shift)."""
    y, stats = backend.conv_fused(x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False, stride,
                                  padding, dilation, groups, True)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    scale, shift = backend.bn_train_finalize(stats, count, bn_weight, bn_bias, eps, running_mean, running_var,
                                             num_batches_tracked, momentum)
    return y, stats, scale, shift


def composed_conv_bn_train_backward(backend, grad_y: Optional[Tensor], grad_scale: Optional[Tensor],
                                    grad_shift: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
                                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                    groups: int, y: Tensor, stats: Tensor, bn_weight: Optional[Tensor], eps: float,
                                    needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """conv_bn_train's gradients (CONV_BN_GRAD_NAMES; None where not needed or absent) from `backend`'s
    bn_finalize_backward (-> grad_stats) and conv_fused_backward. An absent grad_y / grad_scale / grad_shift is
    zero."""
    needs = [bool(v) for v in needs_grad]
    count = y.shape[0] * y.shape[2] * y.shape[3]
    conv_needs = needs[:5] + [False] * 3
    need_stats = any(conv_needs)
    d_stats, d_bn_weight, d_bn_bias = backend.bn_finalize_backward(grad_scale, grad_shift, stats, count, bn_weight,
                                                                   eps, [need_stats, needs[5], needs[6]])
    grads: list[Optional[Tensor]] = [None] * 5
    if need_stats:
        if grad_y is None:
            grad_y = torch.zeros_like(y, memory_format=torch.channels_last)
        grads = list(backend.conv_fused_backward(grad_y, d_stats, x, weight, bias, in_scale, in_shift, in_relu, None,
                                                 None, None, False, stride, padding, dilation, groups, y, conv_needs,
                                                 stats)[:5])
    return [*grads, d_bn_weight if needs[5] else None, d_bn_bias if needs[6] else None]


class JunctionSaved(NamedTuple):
    """What a junction's backward reads (ops/conv_bn_junction.py): its saved tensors, then its convs' configs.
    Without a shortcut conv, shortcut_* and stats_s are None and shortcut_config None; with one, the residual,
    residual_scale and residual_shift are its (y, scale, shift)."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    in_scale: Optional[Tensor]
    in_shift: Optional[Tensor]
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    residual: Optional[Tensor]
    residual_scale: Optional[Tensor]
    residual_shift: Optional[Tensor]
    y: Tensor                       # the tail conv's output and statistics, its BN's scale and shift
    stats: Tensor
    scale: Tensor
    shift: Tensor
    out: Tensor                     # the tail's output: the head conv's input
    head_weight: Tensor
    head_bias: Optional[Tensor]
    head_bn_weight: Optional[Tensor]
    head_bn_bias: Optional[Tensor]
    y_h: Tensor
    stats_h: Tensor
    shortcut_x: Optional[Tensor]
    shortcut_weight: Optional[Tensor]
    shortcut_bias: Optional[Tensor]
    shortcut_bn_weight: Optional[Tensor]
    shortcut_bn_bias: Optional[Tensor]
    stats_s: Optional[Tensor]
    relu_bits: Optional[Tensor]     # out's ReLU mask as bits (a backend's bn_apply_relu_bits), or None
    config: tuple                   # (in_relu, stride, padding, dilation, groups, eps) of the tail conv and its BN
    head_config: tuple              # the same of the head conv (no prologue)
    shortcut_config: Optional[tuple]  # the same of the shortcut conv, or None
    relu: bool

    def inputs(self) -> tuple:
        """The node's inputs in JUNCTION_GRAD_NAMES' order (a shortcut's residual* are its outputs: not inputs)."""
        residual = (None,) * 3 if self.shortcut_config is not None else (self.residual, self.residual_scale,
                                                                          self.residual_shift)
        return (self.x, self.weight, self.bias, self.in_scale, self.in_shift, self.bn_weight, self.bn_bias, *residual,
                self.head_weight, self.head_bias, self.head_bn_weight, self.head_bn_bias, self.shortcut_x,
                self.shortcut_weight, self.shortcut_bias, self.shortcut_bn_weight, self.shortcut_bn_bias)


def composed_conv_bn_junction_backward(backend, grad_out: Optional[Tensor], grad_y_h: Optional[Tensor],
                                       grad_scale_h: Optional[Tensor], grad_shift_h: Optional[Tensor],
                                       saved: JunctionSaved, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """The gradients (JUNCTION_GRAD_NAMES; None where not needed or absent) of a junction (ops/conv_bn_junction.py):
        out = bn_apply(y, scale, shift, residual, residual_scale, residual_shift, relu)   (y, scale, shift: the
              tail's conv_bn_train of x, weight, bias, in_scale, in_shift, bn_weight, bn_bias; with a shortcut conv,
              (residual, residual_scale, residual_shift) its conv_bn_train of shortcut_x, shortcut_weight, ...)
        (y_h, scale_h, shift_h) = conv_bn_train(out, head_weight, head_bias, bn: head_bn_weight, head_bn_bias)
    from the gradients of (out, y_h, scale_h, shift_h) (any may be None: zero), as `backend`'s conv_bn_train_backward
    (head), bn_apply_backward of d_out = dx_h + grad_out, conv_bn_train_backward (tail, and shortcut)."""
    sv = saved
    needs = [bool(v) for v in needs_grad]
    grads: list[Optional[Tensor]] = [None] * len(JUNCTION_GRAD_NAMES)
    shortcut = sv.shortcut_config is not None
    tail = any(needs[:10]) or any(needs[14:])
    h_needs = [tail, needs[10], needs[11], False, False, needs[12], needs[13]]
    _, h_stride, h_padding, h_dilation, h_groups, h_eps = sv.head_config
    if any(h_needs) and not (grad_y_h is None and grad_scale_h is None and grad_shift_h is None):
        h_grads = backend.conv_bn_train_backward(grad_y_h, grad_scale_h, grad_shift_h, sv.out, sv.head_weight,
                                                 sv.head_bias, None, None, False, h_stride, h_padding, h_dilation,
                                                 h_groups, sv.y_h, sv.stats_h, sv.head_bn_weight, h_eps, h_needs)
        grads[10:14] = h_grads[1], h_grads[2], h_grads[5], h_grads[6]
        dx_h = h_grads[0]
        if dx_h is not None:  # (in autograd's order: the gradient from out's other consumers first)
            grad_out = dx_h if grad_out is None else grad_out + dx_h
    if not tail or grad_out is None:
        return grads
    inner = any(needs[:7])
    s_needs = needs[14:16] + [needs[16], False, False, needs[17], needs[18]]
    res_needs = [any(s_needs)] * 3 if shortcut else needs[7:10]
    d_y, d_scale, d_shift, d_res, d_rscale, d_rshift = backend.bn_apply_backward(
        grad_out, sv.y, sv.scale, sv.shift, sv.residual, sv.residual_scale, sv.residual_shift, sv.relu, sv.out,
        [inner, inner, inner, *res_needs])
    if shortcut:
        if any(s_needs):
            in_relu, stride, padding, dilation, groups, eps = sv.shortcut_config
            s_grads = backend.conv_bn_train_backward(d_res, d_rscale, d_rshift, sv.shortcut_x, sv.shortcut_weight,
                                                     sv.shortcut_bias, None, None, False, stride, padding, dilation,
                                                     groups, sv.residual, sv.stats_s, sv.shortcut_bn_weight, eps,
                                                     s_needs)
            grads[14:19] = s_grads[0], s_grads[1], s_grads[2], s_grads[5], s_grads[6]
    else:
        grads[7:10] = d_res, d_rscale, d_rshift
    if inner:
        in_relu, stride, padding, dilation, groups, eps = sv.config
        grads[:7] = backend.conv_bn_train_backward(d_y, d_scale, d_shift, sv.x, sv.weight, sv.bias, sv.in_scale,
                                                   sv.in_shift, in_relu, stride, padding, dilation, groups, sv.y,
                                                   sv.stats, sv.bn_weight, eps, needs[:7])
    return grads
