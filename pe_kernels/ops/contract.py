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
