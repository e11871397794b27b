"""The backward of ops.conv_bn_junction (a block's tail conv -> BN -> + residual -> act, and the next block's first
conv -> BN of its output) as two GEMM pairs: four launches (five with an affine residual's gradient).

    head:  wgrad and dgrad of the head conv (g_acc of its BN formed on load, conv_bn_bwd); the dgrad's epilogue is
           the tail's backward (TailBwd): g = where(out <= 0, 0, dx_h + grad_out) stored once, and the sums
           d_scale = sum g*y, d_shift = sum g (d_residual_scale = sum g*residual) by its last programs
    tail:  wgrad and dgrad of the tail conv from grad_y = g scaled by `scale` on load (GY_SCALE): d_y = g * scale
           is never stored
    d_residual = g itself for an identity residual; g * residual_scale (one bn_apply launch) for an affine one;
    d_residual_shift = sum g.

Where the head's fast path does not exist (no head weight gradient, an empty batch) or nothing before the head
needs a gradient, the composition of this backend's own ops (contract.composed_conv_bn_junction_backward).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..ops.contract import composed_conv_bn_junction_backward
from ._common import Tensor, identity_vector
from .bn_apply import bn_apply_fwd
from .conv_bwd import TailBwd, conv_bn_bwd_ext, fast_backward
from .conv_fwd import conv_geometry


def conv_bn_junction_backward(grad_out: Optional[Tensor], grad_y_h: Optional[Tensor],
                              grad_scale_h: Optional[Tensor], grad_shift_h: Optional[Tensor], saved: tuple,
                              config: tuple, head_config: tuple, relu: bool,
                              needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Triton implementation of contract.composed_conv_bn_junction_backward (same arguments and results: the
    gradients of JUNCTION_GRAD_NAMES, None where not needed or absent)."""
    (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias, residual, residual_scale, residual_shift, y, stats,
     scale, shift, out, h_weight, h_bias, h_bn_weight, h_bn_bias, y_h, stats_h) = saved
    needs = [bool(v) for v in needs_grad]
    in_relu, stride, padding, dilation, groups, eps = config
    _, h_stride, h_padding, h_dilation, h_groups, h_eps = head_config
    tail = any(needs[:10])
    h_geo = conv_geometry(out, h_weight, h_stride, h_padding, h_dilation, h_groups)
    if not tail or not fast_backward(h_geo, needs[10]):
        return composed_conv_bn_junction_backward(sys.modules[__package__], grad_out, grad_y_h, grad_scale_h,
                                                  grad_shift_h, saved, config, head_config, relu, needs)
    grads: list[Optional[Tensor]] = [None] * 14
    has_rscale = residual is not None and residual_scale is not None
    tail_bwd = TailBwd(y, grad_out, residual if has_rscale and needs[8] else None, relu)
    h_grads, sums = conv_bn_bwd_ext(grad_y_h, grad_scale_h, grad_shift_h, out, h_weight, h_bias, None, None, False,
                                    h_stride, h_padding, h_dilation, h_groups, y_h, stats_h, h_bn_weight, h_eps,
                                    [True, needs[10], needs[11], False, False, needs[12], needs[13]], tail=tail_bwd)
    grads[10:] = h_grads[1], h_grads[2], h_grads[5], h_grads[6]
    g = h_grads[0]
    d_scale, d_shift, d_rscale = sums
    if needs[7] and residual is not None:
        if residual_scale is None:
            grads[7] = g
        else:
            zero = identity_vector(0.0, residual_scale.shape[0], g.device)
            grads[7] = bn_apply_fwd(g, residual_scale, zero, None, None, None, False)
    if needs[8] and has_rscale:
        grads[8] = d_rscale
    if needs[9] and residual is not None and residual_shift is not None:
        grads[9] = d_shift  # (read below by the tail conv's backward only, never written)
    if any(needs[:7]):
        grads[:7] = conv_bn_bwd_ext(g, d_scale, d_shift, x, weight, bias, in_scale, in_shift, in_relu, stride,
                                    padding, dilation, groups, y, stats, bn_weight, eps, needs[:7],
                                    grad_y_scale=scale)[0]
    return grads
