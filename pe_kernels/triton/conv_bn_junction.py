"""The backward of ops.conv_bn_junction (a block's tail conv -> BN -> + residual -> act, and the next block's first
conv -> BN of its output) as two launches per conv, wgrad and dgrad: four (six with a shortcut conv in the node; five
with an affine residual given as a tensor, whose gradient g * residual_scale takes a bn_apply launch).

    head:  wgrad and dgrad of the head conv (g_acc of its BN formed on load, conv_bn_bwd); the dgrad's epilogue is
           the tail's backward (TailBwd): g = where(out <= 0, 0, dx_h + grad_out) stored once (the mask read from
           the forward's bits: bn_apply_relu_bits), and the sums
           d_scale = sum g*y, d_shift = sum g (d_residual_scale = sum g*residual) by its last programs
    tail:  wgrad and dgrad of the tail conv from grad_y = g scaled by `scale` on load (grad_y_scale): d_y = g * scale
           is never stored
    shortcut (a shortcut conv in the node): its wgrad and dgrad from g scaled by residual_scale on load, its BN's
           gradients d_residual_scale = sum g*residual, d_residual_shift = sum g
    otherwise d_residual = g itself for an identity residual; g * residual_scale (one bn_apply launch) for an
    affine one; d_residual_shift = sum g.

Where the head's fast path does not exist (no head weight gradient, an empty batch) or nothing before the head
needs a gradient, the composition of this backend's own ops (contract.composed_conv_bn_junction_backward).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from ..ops.contract import JUNCTION_GRAD_NAMES, JunctionSaved, composed_conv_bn_junction_backward
from ._common import Tensor, identity_vector
from .bn_apply import bn_apply_fwd
from .conv_bwd import TailBwd, conv_bn_bwd_ext, fast_backward


def conv_bn_junction_backward(grad_out: Optional[Tensor], grad_y_h: Optional[Tensor],
                              grad_scale_h: Optional[Tensor], grad_shift_h: Optional[Tensor], saved: JunctionSaved,
                              needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Triton implementation of contract.composed_conv_bn_junction_backward (same arguments and results: the
    gradients of JUNCTION_GRAD_NAMES, None where not needed or absent)."""
    sv = saved
    needs = [bool(v) for v in needs_grad]
    _, h_stride, h_padding, h_dilation, h_groups, h_eps = sv.head_config
    shortcut = sv.shortcut_config is not None
    s_needs = needs[14:16] + [needs[16], False, False, needs[17], needs[18]]
    tail = any(needs[:10]) or any(s_needs)
    if not tail or not fast_backward(sv.y_h, needs[10]):  # (the head's checks: conv_bn_bwd_ext's memoised plan)
        return composed_conv_bn_junction_backward(sys.modules[__package__], grad_out, grad_y_h, grad_scale_h,
                                                  grad_shift_h, saved, needs)
    grads: list[Optional[Tensor]] = [None] * len(JUNCTION_GRAD_NAMES)
    has_rscale = sv.residual is not None and sv.residual_scale is not None
    want_rscale = has_rscale and (any(s_needs) if shortcut else needs[8])
    tail_bwd = TailBwd(sv.y, grad_out, sv.residual if want_rscale else None, sv.relu,
                       sv.relu_bits if sv.relu_bits is not None and sv.relu_bits.dtype == torch.int32 else None)
    h_grads, sums = conv_bn_bwd_ext(grad_y_h, grad_scale_h, grad_shift_h, sv.out, sv.head_weight, sv.head_bias, None,
                                    None, False, h_stride, h_padding, h_dilation, h_groups, sv.y_h, sv.stats_h,
                                    sv.head_bn_weight, h_eps,
                                    [True, needs[10], needs[11], False, False, needs[12], needs[13]], tail=tail_bwd)
    grads[10:14] = h_grads[1], h_grads[2], h_grads[5], h_grads[6]
    g = h_grads[0]
    d_scale, d_shift, d_rscale = sums
    if shortcut:
        if any(s_needs):  # the shortcut conv's backward from d_residual = g * residual_scale, formed on load
            in_relu, stride, padding, dilation, groups, eps = sv.shortcut_config
            s_grads = conv_bn_bwd_ext(g, d_rscale, d_shift, sv.shortcut_x, sv.shortcut_weight, sv.shortcut_bias, None,
                                      None, False, stride, padding, dilation, groups, sv.residual, sv.stats_s,
                                      sv.shortcut_bn_weight, eps, s_needs, grad_y_scale=sv.residual_scale)[0]
            grads[14:19] = s_grads[0], s_grads[1], s_grads[2], s_grads[5], s_grads[6]
    else:
        if needs[7] and sv.residual is not None:
            if sv.residual_scale is None:
                grads[7] = g
            else:
                zero = identity_vector(0.0, sv.residual_scale.shape[0], g.device)
                grads[7] = bn_apply_fwd(g, sv.residual_scale, zero, None, None, None, False)
        if needs[8] and has_rscale:
            grads[8] = d_rscale
        if needs[9] and sv.residual is not None and sv.residual_shift is not None:
            grads[9] = d_shift  # (read below by the tail conv's backward only, never written)
    if any(needs[:7]):
        in_relu, stride, padding, dilation, groups, eps = sv.config
        grads[:7] = conv_bn_bwd_ext(g, d_scale, d_shift, sv.x, sv.weight, sv.bias, sv.in_scale, sv.in_shift, in_relu,
                                    stride, padding, dilation, groups, sv.y, sv.stats, sv.bn_weight, eps, needs[:7],
                                    grad_y_scale=sv.scale)[0]
    return grads
