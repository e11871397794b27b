"""The `cuda` backend: CUDA C++ kernels (csrc/, built as pe_kernels._C), same functions as pe_kernels/reference.py.

Each function has exactly the name, arguments and return convention of its reference twin. The wrappers convert
inputs to what the kernels take — activations and weights channels_last contiguous (NHWC / KRSC), per-channel
vectors contiguous in the parameter dtype (fp32; fp64 for fp64 activations) — call `_C`, and cast gradients back
to their inputs' dtypes. 4-D outputs are channels_last. fp32 convolutions use TF32 when
torch.backends.cudnn.allow_tf32 is set (torch's default for convolutions).

The scale gradients (d scale and d residual_scale of bn_apply_backward, d in_scale and d out_scale of
conv_fused_backward) are centred sums as reference.sum_centred: sum g*(v - v0) + v0 * sum g, v0 = the channel's
value at row 0 (0 where not finite), the second term added once in the kernels' fixed-order reduction
(csrc/README.md, "Centred scale-gradient sums").

When the extension is missing every function raises RuntimeError with `load_error()` (why it is missing).
Importing this module never raises and never queries a GPU. The kernels are compile-checked in CI only and have
not been validated on a GPU yet (csrc/README.md).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from .. import reference
from ..ops.contract import (composed_conv_bn_train, composed_conv_bn_train_backward, grad_like_weight,
                            param_dtype)
from . import _ext
from ._ext import is_built, load_error

Tensor = torch.Tensor

__all__ = [
    "is_built",
    "load_error",
    "conv_fused",
    "conv_fused_backward",
    "bn_finalize",
    "bn_running_update",
    "bn_train_finalize",
    "bn_finalize_backward",
    "conv_bn_train",
    "conv_bn_train_backward",
    "bn_apply",
    "bn_apply_backward",
]

_CL = torch.channels_last


def _act(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous(memory_format=_CL)


def _opt_act(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else _act(t, dtype)


def _vec(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    return v * 2 if len(v) == 1 else v


def _cast(g: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    if g is None or like is None or g.dtype == like.dtype:
        return g
    return g.to(like.dtype)


def _allow_tf32() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


def conv_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor],
               out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
               compute_stats: bool) -> tuple[Tensor, Tensor]:
    """Grouped conv with prologue/epilogue (reference.conv_fused). Returns (y channels_last, stats (2, K) or (0,)).

    stats = [mean, M2] of acc rounded to x.dtype and back (fp16/bf16; acc itself for fp32/fp64): the values the BN
    apply reads from the stored y (.lab/CONTRACT.md)."""
    C = _ext.get()
    pdt = param_dtype(x.dtype)
    return C.conv_fused(_act(x), _act(weight, x.dtype), _vec(bias, pdt), _vec(in_scale, pdt), _vec(in_shift, pdt),
                        bool(in_relu), _vec(out_scale, pdt), _vec(out_shift, pdt), _opt_act(residual, x.dtype),
                        bool(out_relu), _pair(stride), _pair(padding), _pair(dilation), int(groups),
                        bool(compute_stats), _allow_tf32())


def conv_fused_backward(grad_y: Tensor, grad_stats: Optional[Tensor], x: Tensor, weight: Tensor,
                        bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                        in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                        residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int, y: Tensor,
                        needs_grad: Sequence[bool], stats: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Gradients w.r.t. reference.CONV_GRAD_NAMES (None where needs_grad is False or the input is None).

    `stats` is the forward's (2, K) [mean, M2]; required with grad_stats, which flows into the accumulator as
    grad_stats[0]/n + 2*grad_stats[1]*(acc_s - mean), n = N*P*Q, acc_s = acc rounded to x.dtype and back (the
    values the forward's statistics were taken of; acc itself for fp32/fp64). Without grad_stats that term is absent
    (a NaN acc does not make the gradients NaN).
    """
    pdt = param_dtype(x.dtype)
    gs = None if grad_stats is None or grad_stats.numel() == 0 else grad_stats.to(pdt).contiguous()
    st = None if stats is None or stats.numel() == 0 else stats.to(pdt).contiguous()
    if gs is not None:
        K = weight.shape[0]
        if st is None:
            raise ValueError(f"conv_fused_backward: grad_stats (shape {tuple(gs.shape)}) is given but stats, the "
                             f"forward's (2, {K}) statistics [mean, m2], is {'None' if stats is None else 'empty'}")
        if tuple(st.shape) != (2, K) or tuple(gs.shape) != (2, K):
            raise ValueError(f"conv_fused_backward: stats {tuple(st.shape)} and grad_stats {tuple(gs.shape)} must "
                             f"both be (2, {K})")
    needs = [bool(n) for n in needs_grad]
    if len(needs) != 8:
        raise ValueError(f"needs_grad must have 8 entries (x, weight, bias, in_scale, in_shift, out_scale, "
                         f"out_shift, residual), got {len(needs)}")
    C = _ext.get()
    grads = C.conv_fused_backward(
        _act(grad_y, x.dtype), gs, _act(x), _act(weight, x.dtype), _vec(bias, pdt), _vec(in_scale, pdt),
        _vec(in_shift, pdt), bool(in_relu), _vec(out_scale, pdt), _vec(out_shift, pdt), _opt_act(residual, x.dtype),
        bool(out_relu), _pair(stride), _pair(padding), _pair(dilation), int(groups), _act(y, x.dtype), needs,
        st, _allow_tf32())
    inputs = [x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual]
    out: list[Optional[Tensor]] = []
    for i, (g, t) in enumerate(zip(grads, inputs)):
        g = _cast(g, t)
        if g is not None and t is not None and t.dim() == 1:
            g = g.reshape(t.shape)
        if i == 1 and g is not None:
            # The kernel writes KRSC (channels_last); the contract (ops/contract.grad_like_weight): the weight's strides.
            g = grad_like_weight(g, weight)
        out.append(g)
    return out


def bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """Training-mode BN as an affine map from stats = [mean, M2] (var = M2 / count): (scale, shift), each (K,)."""
    C = _ext.get()
    stats = stats.contiguous()
    return C.bn_finalize(stats, int(count), _vec(weight, stats.dtype), _vec(bias, stats.dtype), float(eps))


def bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                      momentum: float) -> None:
    """In place, as BatchNorm2d: running = (1 - momentum) * running + momentum * batch (var = M2 / (count - 1))."""
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
    C = _ext.get()
    stats = stats.contiguous()
    direct = all(t.dtype == stats.dtype and t.is_contiguous() and t.dim() == 1 for t in (running_mean, running_var))
    if direct:
        C.bn_running_update(stats, int(count), running_mean, running_var, float(momentum))
        return
    rm = running_mean.reshape(-1).to(stats.dtype).contiguous()
    rv = running_var.reshape(-1).to(stats.dtype).contiguous()
    C.bn_running_update(stats, int(count), rm, rv, float(momentum))
    with torch.no_grad():
        running_mean.copy_(rm.view_as(running_mean))
        running_var.copy_(rv.view_as(running_var))


def bn_train_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> tuple[Tensor, Tensor]:
    """reference.bn_train_finalize: the num_batches_tracked bump and the running update (this extension's kernel
    for a numeric momentum; ATen ops for momentum None, whose factor 1/num_batches_tracked stays on the device),
    then bn_finalize."""
    if momentum is None or running_mean is None:
        reference.bn_bookkeeping(stats, count, running_mean, running_var, num_batches_tracked, momentum)
    else:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        bn_running_update(stats, count, running_mean, running_var, momentum)
    return bn_finalize(stats, count, weight, bias, eps)


def bn_finalize_backward(grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], stats: Tensor, count: int,
                         weight: Optional[Tensor], eps: float, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """reference.bn_finalize_backward (K-element vectors; ATen ops)."""
    return reference.bn_finalize_backward(grad_scale, grad_shift, stats, count, weight, eps, needs_grad)


def conv_bn_train(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor],
                  momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """reference.conv_bn_train as this extension's conv_fused then bn_train_finalize (no fused kernel yet)."""
    return composed_conv_bn_train(sys.modules[__name__], x, weight, bias, in_scale, in_shift, in_relu, stride,
                                  padding, dilation, groups, bn_weight, bn_bias, eps, running_mean, running_var,
                                  num_batches_tracked, momentum)


def conv_bn_train_backward(grad_y: Optional[Tensor], grad_scale: Optional[Tensor], grad_shift: Optional[Tensor],
                           x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                           in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], groups: int, y: Tensor, stats: Tensor,
                           bn_weight: Optional[Tensor], eps: float,
                           needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """reference.conv_bn_train_backward as bn_finalize_backward then this extension's conv_fused_backward."""
    return composed_conv_bn_train_backward(sys.modules[__name__], grad_y, grad_scale, grad_shift, x, weight, bias,
                                           in_scale, in_shift, in_relu, stride, padding, dilation, groups, y, stats,
                                           bn_weight, eps, needs_grad)


def bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    """out = act(y*scale + shift + residual*residual_scale + residual_shift), channels_last in y.dtype."""
    C = _ext.get()
    pdt = param_dtype(y.dtype)
    return C.bn_apply(_act(y), _vec(scale, pdt), _vec(shift, pdt), _opt_act(residual, y.dtype),
                      _vec(residual_scale, pdt), _vec(residual_shift, pdt), bool(relu))


def bn_apply_backward(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                      residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool,
                      out: Tensor, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Gradients of bn_apply w.r.t. reference.APPLY_GRAD_NAMES; `out` is the forward output (ReLU mask)."""
    C = _ext.get()
    pdt = param_dtype(y.dtype)
    needs = [bool(n) for n in needs_grad]
    if len(needs) != 6:
        raise ValueError(f"needs_grad must have 6 entries (y, scale, shift, residual, residual_scale, "
                         f"residual_shift), got {len(needs)}")
    grads = C.bn_apply_backward(_act(grad_out, y.dtype), _act(y), _vec(scale, pdt), _vec(shift, pdt),
                                _opt_act(residual, y.dtype), _vec(residual_scale, pdt), _vec(residual_shift, pdt),
                                bool(relu), _act(out, y.dtype), needs)
    grads = list(grads)
    if grads[3] is not None and residual is not None:
        grads[3] = _cast(grads[3], residual)
    return grads
