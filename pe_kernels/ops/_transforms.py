"""torch.func transforms and forward-mode AD: the ops as compositions of differentiable ATen ops.

The custom ops carry a reverse-mode autograd formula (register_autograd), which torch.func's transforms
(grad, vmap, jvp, jacrev, jacfwd, hessian, over functional_call or not) and forward-mode AD
(torch.autograd.forward_ad) cannot use. Under any of them the public op wrappers run this composition instead:
the math of the `torch` backend (pe_kernels.reference), which every transform differentiates and batches
exactly. `auto` takes it with its reason in `last_dispatch()`; a forced `triton` or `cuda` backend raises
BackendUnavailableError instead of falling back. Under torch.compile (tracing) the ops stay custom ops.

Statistics as the op contract: stats = [mean, m2] with m2 = sum (acc_s - mean)^2 (two passes, stable), acc_s = acc
rounded to x.dtype (reference.stored_acc; straight-through here, so that autograd sees d acc_s / d acc = 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd import forward_ad

from .. import _backend, reference

Tensor = torch.Tensor

_REASON = "torch.func transform or forward-mode AD active: composite ATen ops (the torch backend's math)"


def transforms_active() -> bool:
    """True under a torch.func transform or forward-mode AD (outside torch.compile tracing)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def composite_required(op: str) -> bool:
    """True when a torch.func transform or forward-mode AD is active (outside torch.compile tracing).

    Raises BackendUnavailableError when the user forced a kernel backend, which cannot run under them."""
    if not transforms_active():
        return False
    requested = _backend.requested_backend()
    if requested not in ("auto", "torch"):
        raise _backend.BackendUnavailableError(
            f"pe_kernels::{op}: the {requested!r} backend cannot run under torch.func transforms (grad, vmap, jvp, "
            "...) or forward-mode AD; use the 'torch' or 'auto' backend there (they run differentiable ATen "
            "ops), or plain autograd (loss.backward()) with the kernels")
    _backend.record(op, "torch", _REASON)
    return True


def conv_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
               residual: Optional[Tensor], out_relu: bool, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, compute_stats: bool) -> tuple[Tensor, Tensor]:
    """pe_kernels::conv_fused as differentiable ATen ops: (y in x.dtype, stats [mean, m2] or (0,))."""
    acc, z = reference._conv_fused_math(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                                        residual, out_relu, stride, padding, dilation, groups)
    y = z.to(x.dtype)
    if not compute_stats:
        return y, acc.new_empty((0,))
    # The statistics of acc as stored (reference.stored_acc), straight-through for autograd: d acc_s / d acc = 1,
    # so the gradient of m2 reaches acc as 2 (acc_s - mean), as conv_fused_backward forms it.
    acc_s = acc if acc.dtype == x.dtype else acc + (reference.stored_acc(acc.detach(), x.dtype) - acc.detach())
    mean = acc_s.mean(dim=(0, 2, 3))
    m2 = (acc_s - mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    return y, torch.stack([mean, m2])


def bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) of training BatchNorm from stats = [mean, m2] of `count` values."""
    mean, m2 = stats[0], stats[1]
    invstd = torch.rsqrt(m2 / count + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                      momentum: float) -> None:
    """BatchNorm2d's running-statistics update, in place, outside autograd."""
    with torch.no_grad():
        mean, var = stats[0], stats[1] / (count - 1)
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * var.to(running_var.dtype))


def bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], residual_scale: Optional[Tensor],
             residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    """pe_kernels::bn_apply as differentiable ATen ops."""
    return reference._bn_apply_math(y, scale, shift, residual, residual_scale, residual_shift, relu).to(y.dtype)


def create_graph_required(op: str, requested: str) -> bool:
    """True inside a backward run with create_graph=True (double backward): the kernels' backward is not itself
    differentiable, so the gradient is recomputed as differentiable ATen ops. `requested`: the backend the forward
    was asked for ('' = the current request); a forced kernel backend raises instead of falling back."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    requested = requested or _backend.requested_backend()
    if requested not in ("auto", "torch"):
        raise _backend.BackendUnavailableError(
            f"pe_kernels::{op}: double backward (create_graph=True) is not supported by the {requested!r} "
            "backend; use the 'torch' or 'auto' backend for higher-order gradients")
    _backend.record(op, "torch", "create_graph=True (double backward): composite ATen ops (the torch backend's "
                                 "math)")
    return True


def differentiable_vjp(outputs: Sequence[Tensor], grad_outputs: Sequence[Optional[Tensor]],
                       inputs: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    """Gradients of `outputs` (recomputed by a composite forward from the saved inputs) w.r.t. the `inputs`
    that need them, as a differentiable graph (create_graph=True); None for the others."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None and t.requires_grad]
    result: list[Optional[Tensor]] = [None] * len(inputs)
    if not pairs or not wanted:
        return result
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return result
