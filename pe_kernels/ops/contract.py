"""The op contract every backend implements (pe_kernels.reference, pe_kernels.triton, pe_kernels.cuda).

A backend is a module with the functions of `Backend` below, each with exactly these arguments and results; the
math of each is written out in pe_kernels/reference.py (the oracle). The backends implement the contract, they do
not define it: gradient orders, the per-channel dtype and the checks shared by the op wrappers live here.
Adding an op: its function here, its schema and autograd in ops/<op>.py, its reference, its kernels in each
backend, its tests against the reference. tests/test_ops.py checks that every backend module matches `Backend`.
This module imports nothing from the package (the backends may import it).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor

# Order of the gradients returned by conv_fused_backward.
CONV_GRAD_NAMES = ("x", "weight", "bias", "in_scale", "in_shift", "out_scale", "out_shift", "residual")
# Order of the gradients returned by bn_finalize_backward.
FINALIZE_GRAD_NAMES = ("stats", "weight", "bias")
# Order of the gradients returned by bn_apply_backward.
APPLY_GRAD_NAMES = ("y", "scale", "shift", "residual", "residual_scale", "residual_shift")


def param_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """dtype of per-channel vectors and statistics: fp64 for fp64 activations, fp32 otherwise."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


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

    def bn_apply(self, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor: ...

    def bn_apply_backward(self, grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                          residual: Optional[Tensor], residual_scale: Optional[Tensor],
                          residual_shift: Optional[Tensor], relu: bool, out: Tensor,
                          needs_grad: Sequence[bool]) -> list[Optional[Tensor]]: ...


BACKEND_FUNCTIONS = tuple(name for name in Backend.__dict__ if not name.startswith("_"))
