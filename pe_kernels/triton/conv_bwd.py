"""Fused grouped convolution, backward: epilogue backward, dgrad (+ prologue backward), wgrad; and the backward of
a training conv -> BatchNorm (conv_bn_train_backward) in the wgrad and the dgrad alone.

Math (gradients of pe_kernels.reference.conv_fused; g_y = grad_y, acc = conv(x') + bias)::

    g         = where(y <= 0, 0, g_y)  (if out_relu; torch's ReLU backward: a NaN y passes the gradient)
    d_residual = g,  d_out_shift[k] = sum g,  d_out_scale[k] = sum g * acc
    g_acc     = g * out_scale[k] + grad_stats[0, k] / n + 2 * grad_stats[1, k] * (acc_s - mean[k])
                (stats = [mean, m2] of the forward, n = N*P*Q; acc_s - mean before the product: no cancellation;
                acc_s = acc rounded to x.dtype, the values the forward's statistics were taken of)
    d_bias[k] = sum g_acc
    dx'       = conv_transpose(g_acc, w)                  (dgrad: implicit GEMM over (r, s, k))
    gm        = where(x * in_scale + in_shift <= 0, 0, dx')  (if in_relu, else dx')
    dx        = gm * in_scale,  d_in_scale[c] = sum gm * x,  d_in_shift[c] = sum gm
    (the scale sums are formed centred: d_out_scale on each tile's mean, bn_apply.sum_centred; d_in_scale and the
    tail's on each channel's first value, as reference.sum_centred, bn_apply.channel_centre)
    dw[k,c,r,s] = sum_{n,p,q} g_acc[n,k,p,q] * x'[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw]   (wgrad)

Sums run over (n, p, q) or (n, h, w). All of them are deterministic: every program writes fp32 partial sums
to its own slot, reduced afterwards in a fixed order (no atomics on values). Slots hold PART_M rows whatever
the autotune config, and every config writes every slot (store_part): no zeroing, nothing stale between
autotune trials. acc (for d_out_scale or grad_stats[1]) is the saved output y when the forward had no
epilogue (y = acc in x.dtype); otherwise it is recomputed with the forward kernel (fp32 output).

Launches: the epilogue backward, the wgrad and the dgrad, nothing else on the device (a training conv: no
epilogue, no bias). The wgrad's split-M partials and the dgrad's prologue sums are reduced inside those kernels in
two levels: the last program of a chunk (of splits, or of slots) to arrive at its int32 counter sums the chunk, the
last chunk of a tile or column block sums the chunks' sums (_common.last_arrival, sum_chunks_if_last; fixed-order
sums, so the result does not depend on which program is last; one program summing them all was a serial tail while
the other SMs idled); the counters are zeroed by the epilogue kernel, which runs before them on the same stream,
and reset by their last programs (autotune trials and CUDA graph replays find them at 0). The epilogue's own sums
(d_bias, d_out_scale, d_out_shift, only with an epilogue or a bias) take one small reduce launch
(_common.reduce_slots, two levels too). Outputs are written in their final dtype and layout (dw in the weight's dtype
and strides: a channels_last weight gets a channels_last dw).

conv -> BN training backward (conv_bn_bwd; reference.conv_bn_train_backward): BN's batch statistics are those of
the saved y = acc (no epilogue), and its finalize's backward (bn_finalize_grads, per channel, from grad_scale,
grad_shift, stats, bn_weight, eps, n) gives grad_stats = [d_mean, d_m2] and d_bn_weight, d_bn_bias. With
GACC_ON_LOAD the wgrad computes those per-channel terms itself and forms g_acc = grad_y + d_mean/n + 2 d_m2 (y - mean)
on load (stats_grad_on_load, the epilogue kernel's expression, g_acc rounded to x.dtype as the epilogue stores it:
fp32 results equal the composed path's where y is read); its programs of j tile 0 store that g_acc (STORE_GACC,
channels_last) for the dgrad launched after it, which reads it as a plain operand (stores_gacc: the same bytes as
reading grad_y and y) -- except where the dgrad recomputes y: it then forms g_acc on load too, from the terms the
wgrad stored ((3, K) fp32: the dgrad's reduction runs over k, so it would recompute them at every step). The
wgrad's programs of j tile 0 and split 0 write d_bn_weight, d_bn_bias, and those of j tile 0 sum the rounded g_acc
they load into d_bias = sum g_acc (BIAS_GRAD; with a split, (SPLIT, K) fp32 partials summed alongside dw's
partials, in j tile 0). Two launches, no epilogue kernel, no finalize-backward kernel and no reduce launch, when the
weight's gradient is needed (with or without the conv bias's); the counters are then _common.stream_counters.
Other cases: the composition (ops/contract.composed_conv_bn_train_backward).
On that path, for ops.conv_bn_junction (conv_bn_bwd_ext): grad_y may come scaled on load (grad_y * grad_y_scale[k],
always applied: ones when absent); RECOMPUTE_Y (a 1x1 conv without padding or bias, C_g <= 128: recompute_y_allowed)
forms y = W x' from the x' a GEMM reads instead of reading the saved y (the forward's product in another summation
order, rounded as stored: it may differ from the saved y in the last place; the dgrad from its rows' x' tile of all
C_g channels formed once before its loop, X_ONCE, the wgrad from its step's B tile where the j tile holds every
channel, Y_FROM_B); TAIL (TailBwd) makes the dgrad's epilogue the backward of the block tail whose output is x:
g = where(x <= 0, 0, dx' + side) (the mask from the forward's bits where given), stored at dx, and (slots, 2 or 3, C)
partials [sum g*y_t, sum g, sum g*residual] summed by the last M tile of each column block into the tail's d_scale,
d_shift, d_residual_scale.

Kernels:
  _conv_bwd_epilogue_kernel  elementwise over (M = N*P*Q) x K tiles; writes g_acc (x.dtype), d_residual and
                             (slots, 3, K) partials [sum g, sum g*acc, sum g_acc]; zeroes the counters.
  _conv_dgrad_kernel         rows (n, h, w) by stride phase (h % sh, w % sw), columns c of group g, reduction
                             j = (t, u, k) with k fastest over the phase's live taps only: an output row p exists
                             for (h, r) only when h + ph - r*dh is a multiple of sh, which holds for the same taps
                             r = r0 + (sh / gcd(dh, sh)) t on every row of a phase (a 3x3 / stride 2 dgrad: 1, 2, 2
                             or 4 of the 9 taps, not all 9 masked).
                             The prologue backward runs in its epilogue; (slots, 2, C) partials, summed by
                             the last M tile of each column block into d_in_scale, d_in_shift.
  _conv_wgrad_kernel         rows k of group g, columns j = (r, s, c) with c fastest, reduction over
                             m = (n, p, q) split into SPLIT parts: (SPLIT, K, R*S*C_g) fp32 partials, summed
                             in two levels into dw (weight's strides and dtype): the last split of each chunk of
                             SPLIT_CHUNK splits (split_chunk: ~sqrt(SPLIT)) sums the chunk, the tile's last chunk
                             the chunks' sums (one chunk up to 8 splits); SPLIT = 1 writes dw directly. BIAS_GRAD:
                             the programs of j tile 0 also sum g_acc over their m range into d_bias (SPLIT = 1) or
                             (SPLIT, K) fp32 partials (summed alongside dw's). Rows addressed as m times one
                             stride where dense (FLAT_G, FLAT_X), else split into (n, p, q): per step from its first
                             row where the steps align with the image rows (ALIGNED_ROWS, TAP_ROWS) or are whole
                             images (WHOLE_IMAGES: every row's position and bounds loop-invariant), else per row.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops.contract import composed_conv_bn_train_backward
from ._common import (CHUNK_SLOTS, INTERPRET, REDUCE_SLOTS, LaunchPlans, Tensor, advance_tap, affine_pair,
                      apply_prologue, cdiv, channels_last_strides, check_4d, check_same_device, check_shape,
                      check_vector, chunk_counters, dense_rows, divisor_magic, dot_acc, dot_precision, dummy,
                      empty_channels_last, fast_div, gpu_tap_tile_k, gpu_tile_k, gpu_tile_n, identity_vector, krsc,
                      krsc_strides, last_arrival, launch, next_pow2, nhwc_tile, pack_groups, part_rows, pow2_tile,
                      prologue_values, reduce_slots, slot_chunk, slot_chunks, store_part, stream_counters, strides4,
                      sum_chunks_if_last, tap_steps, tensor_key, tile_offsets, upcast_bf16, wide_tiles)
from .bn_apply import channel_centre, sum_centred
from .bn_finalize import bn_finalize_grads
from .conv_fwd import (_NOT_SPECIALIZED, GPU_CONFIGS, ConvGeometry, conv_fwd, conv_geometry, forward_tiles,
                       has_prologue)

_INTERPRET_BLOCK_M = 128   # the interpreter's single configuration


# --------------------------------------------------------------------------------------------------------------
# 0. The BN statistics' gradient terms of g_acc (the epilogue kernel, and the wgrad / dgrad on load)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _bn_grad_terms(gscale_ptr, gshift_ptr, stats_ptr, bnw_ptr, k, mask, stats_row, count, inv_n, eps):
    """Per output channel k (`mask`ed): (mean, c0, c1, d_bn_weight, d_bn_bias) with c0 = d_mean / n, c1 = 2 d_m2, so
    that g_acc = g + c0 + c1 (y - mean) (stats_grad_on_load). Vectors fp32 contiguous, stats (2, K) with row stride
    `stats_row`; the terms a caller does not use are compiled out."""
    mean = tl.load(stats_ptr + k, mask=mask, other=0.0)
    m2 = tl.load(stats_ptr + stats_row + k, mask=mask, other=0.0)
    g_scale = tl.load(gscale_ptr + k, mask=mask, other=0.0)
    g_shift = tl.load(gshift_ptr + k, mask=mask, other=0.0)
    w = tl.load(bnw_ptr + k, mask=mask, other=0.0).to(tl.float32)
    d_w, d_b, d_mean, d_m2 = bn_finalize_grads(g_scale, g_shift, mean, m2, w, count, eps)
    return mean, d_mean * inv_n, 2.0 * d_m2, d_w, d_b


@triton.jit
def stats_grad_on_load(g, a, c0, c1, mean, mask):
    """g_acc = g + c0 + c1 (a - mean) where `mask`, g elsewhere (tiles broadcast by the caller; fp32): the statistics'
    gradient added to the output's, with d_mean/n = c0, 2 d_m2 = c1, a = acc as the forward's statistics saw it
    (a - mean before the product: no cancellation). One expression for the epilogue kernel and the on-load path, so
    that both round alike."""
    return g + tl.where(mask, c0 + c1 * (a - mean), 0.0)


# --------------------------------------------------------------------------------------------------------------
# 1. Epilogue backward (elementwise + per-channel reductions)
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["P", "Q", "M", "M_KEY", "n_sem"])
def _conv_bwd_epilogue_kernel(
    gy_ptr,         # grad_y (N, K, P, Q), any strides
    y_ptr,          # forward output (N, K, P, Q), any strides (ReLU mask) or unused
    acc_ptr,        # accumulator (N, K, P, Q): y itself or recomputed in fp32, any strides, or unused
    out_scale_ptr,  # (K,) contiguous or unused
    gs_ptr,         # grad_stats (2, K) fp32 contiguous or unused
    stats_ptr,      # the forward's stats (2, K) fp32 contiguous [mean, m2] (with gs_ptr) or unused
    gacc_ptr,       # out: g_acc (N, K, P, Q), any strides
    dres_ptr,       # out: d_residual (N, K, P, Q), any strides, or unused
    part_ptr,       # out: (cdiv(M, PART_M) (+ reduce_slots' room), 3, K) fp32 [sum g, sum g*acc, sum g_acc], or
                    # unused
    sem_ptr,        # out: (n_sem,) int32 counters of the wgrad / dgrad launches that follow, zeroed here
    K, P, Q, M,                  # channels, output height/width, M = N*P*Q
    n_sem,                       # counters to zero
    inv_n,                       # 1 / M (float): grad_stats[0] is the gradient of a mean
    M_KEY,                       # M rounded up to a power of two (autotune key)
    sgn, sgc, sgh, sgw,          # grad_y strides
    syn, syc, syh, syw,          # y strides
    san, sac, sah, saw,          # acc strides
    son, soc, soh, sow,          # g_acc strides
    sdn, sdc, sdh, sdw,          # d_residual strides
    OUT_RELU: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, HAS_ACC: tl.constexpr, HAS_GS: tl.constexpr,
    STORE_DRES: tl.constexpr,
    SUMS: tl.constexpr,          # write the partial sums (d_bias, d_out_scale or d_out_shift is needed)
    PART_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if (pid_m == 0) & (pid_k == 0):
        for s0 in range(0, n_sem, 1024):
            offs_s = s0 + tl.arange(0, 1024)
            tl.store(sem_ptr + offs_s, tl.zeros((1024,), dtype=tl.int32), mask=offs_s < n_sem)
    offs_m, offs_k, mask_m, mask_k, n, p, q, k = nhwc_tile(pid_m, pid_k, M, K, P, Q, BLOCK_M, BLOCK_N)
    mask = mask_m[:, None] & mask_k[None, :]

    g = tl.load(gy_ptr + tile_offsets(n, p, q, k, sgn, sgc, sgh, sgw), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if OUT_RELU:
        yv = tl.load(y_ptr + tile_offsets(n, p, q, k, syn, syc, syh, syw), mask=mask, other=0.0)
        g = tl.where(yv <= 0, 0.0, g)
    if STORE_DRES:
        tl.store(dres_ptr + tile_offsets(n, p, q, k, sdn, sdc, sdh, sdw),
                 g.to(dres_ptr.dtype.element_ty), mask=mask)
    if HAS_ACC:
        a = tl.load(acc_ptr + tile_offsets(n, p, q, k, san, sac, sah, saw), mask=mask, other=0.0)
        a = a.to(tl.float32)
    g_acc = g
    if HAS_OUT_SCALE:
        g_acc = g * tl.load(out_scale_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    if HAS_GS:
        gs0 = tl.load(gs_ptr + offs_k, mask=mask_k, other=0.0)
        gs1 = tl.load(gs_ptr + K + offs_k, mask=mask_k, other=0.0)
        mean = tl.load(stats_ptr + offs_k, mask=mask_k, other=0.0)
        # acc as the forward's statistics saw it: rounded to the stored dtype (g_acc's, x.dtype); a no-op when acc
        # is the saved y, a rounding when it was recomputed in fp32 (an epilogue).
        a_s = a.to(gacc_ptr.dtype.element_ty).to(tl.float32)
        g_acc = stats_grad_on_load(g_acc, a_s, (gs0 * inv_n)[None, :], (2.0 * gs1)[None, :], mean[None, :], mask)
    tl.store(gacc_ptr + tile_offsets(n, p, q, k, son, soc, soh, sow),
             g_acc.to(gacc_ptr.dtype.element_ty), mask=mask)

    if SUMS:
        # Every slot of all three sums is written (zeros where unused): the buffer needs no zeroing.
        store_part(part_ptr, pid_m, M, 3 * K, offs_k, mask_k, tl.sum(g, axis=0), PART_M, BLOCK_M)
        if HAS_ACC:
            g_a = sum_centred(g, a, mask)
        else:
            g_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
        store_part(part_ptr + K, pid_m, M, 3 * K, offs_k, mask_k, g_a, PART_M, BLOCK_M)
        store_part(part_ptr + 2 * K, pid_m, M, 3 * K, offs_k, mask_k, tl.sum(g_acc, axis=0), PART_M, BLOCK_M)


# --------------------------------------------------------------------------------------------------------------
# 2. dgrad: transposed grouped implicit GEMM, prologue backward in the epilogue
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _phase_taps(a, R, PAD, STRIDE, DIL, STEP):
    """The filter taps r in [0, R) that reach input rows h = a (mod STRIDE) (h + PAD - r*DIL a multiple of STRIDE):
    (r0, T, c) with r = r0 + STEP t for t < T (T = 0: none) and p = (h + PAD - r*DIL) / STRIDE = h // STRIDE + c -
    (DIL / gcd) t. Solutions repeat with period STEP = STRIDE / gcd(DIL, STRIDE): the first one, if any, is < STEP."""
    r0 = R
    for r in range(0, STEP):
        live = ((a + PAD - r * DIL) % STRIDE == 0) & (r0 == R) & (r < R)
        r0 = tl.where(live, r, r0)
    T = tl.where(r0 < R, (R - r0 + STEP - 1) // STEP, 0)
    c = (a + PAD - r0 * DIL) // STRIDE   # exact where r0 < R (unused otherwise)
    return r0, T, c


@triton.jit(do_not_specialize=_NOT_SPECIALIZED + ["stats_row", "N", "M_PH", "STEP_H", "STEP_W", "DQ_H", "DQ_W"])
def _conv_dgrad_kernel(
    g_ptr,          # g_acc (N, K, P, Q), any strides; grad_y with GACC_ON_LOAD
    w_ptr,          # weight (K, C_g, R, S), any strides
    x_ptr,          # forward input (N, C, H, W), any strides (prologue recompute) or unused
    in_scale_ptr,   # (C,) contiguous or unused
    in_shift_ptr,   # (C,) contiguous or unused
    y_ptr,          # GACC_ON_LOAD: the forward output y (N, K, P, Q), any strides; else unused
    gscale_ptr,     # unused (the wgrad's: the finalize backward's inputs; their terms come in terms_ptr)
    gshift_ptr,     # unused (likewise)
    stats_ptr,      # unused (likewise)
    bnw_ptr,        # unused (likewise)
    gys_ptr,        # GACC_ON_LOAD: (K,) fp32 contiguous, grad_y's per-channel factor on load (cached ones when
                    # absent: one flag fewer, one compile fewer per layer kind); else unused
    terms_ptr,      # GACC_ON_LOAD: (3, K) fp32 contiguous [mean, d_mean/n, 2 d_m2] per channel, written by the wgrad
                    # launched before (its _bn_grad_terms); else unused
    dx_ptr,         # out: dx (N, C, H, W), any strides, or unused; TAIL: the tail's masked gradient g
    part_ptr,       # out: (sh * sw * cdiv(M_PH, PART_M) + chunks, 2, C) fp32 [sum dx'*mask*x, sum dx'*mask], then
                    # the chunks' level-2 slots (slot_chunks), or unused; TAIL: (.., 2 or 3, C) [sum g*y_t, sum g(,
                    # sum g*residual)]
    dscale_ptr,     # out: (C,) d_in_scale = the total of the first sum (STATS; TAIL: d_scale of the tail), or unused
    dshift_ptr,     # out: (C,) d_in_shift = the total of the second sum (STATS; TAIL: d_shift of the tail), or unused
    sem_ptr,        # (chunk_counters(groups * column blocks, chunks),) int32 counters, 0 at launch (STATS or TAIL),
                    # or unused
    side_ptr,       # TAIL_SIDE: the gradient of x from elsewhere (N, C, H, W), any strides; else unused
    yt_ptr,         # TAIL: the tail's y (N, C, H, W), any strides; else unused
    res_ptr,        # TAIL_RES_SUM: the tail's residual (N, C, H, W), any strides; else unused
    drs_ptr,        # out (TAIL_RES_SUM): (C,) the tail's d_residual_scale = the total of the third sum
    bits_ptr,       # TAIL_BITS: x's ReLU mask as bits (N*H*W, n_words) int32 (bn_apply_relu_bits); else unused
    C, H, W, P, Q, N,            # input channels, input height/width, output height/width, batch
    C_g, K_g, S, RSK,            # channels per group (in/out), filter width, R*S*K_g
    M_KEY,                       # N*H*W rounded up to a power of two (autotune key)
    M_PH,                        # rows of the largest stride phase: N * cdiv(H, sh) * cdiv(W, sw)
    STEP_H, STEP_W, DQ_H, DQ_W,  # live taps of a phase: r = r0 + STEP_H t, p = i + c - DQ_H t (sh / g, dh / g,
                                 # g = gcd(dh, sh)); likewise along w
    count, inv_n, eps,           # unused (the wgrad's)
    stats_row,                   # GACC_ON_LOAD: K, the row stride of terms
    sgn, sgc, sgh, sgw,          # g_acc (grad_y) strides
    syn, syc, syh, syw,          # y strides (GACC_ON_LOAD)
    swk, swc, swr, sws,          # weight strides
    sxn, sxc, sxh, sxw,          # x strides
    sdn, sdc, sdh, sdw,          # dx strides
    ssn, ssc, ssh, ssw,          # side strides (TAIL_SIDE)
    stn, stc, sth, stw,          # y_t strides (TAIL)
    srn, src, srh, srw,          # residual strides (TAIL_RES_SUM)
    n_words,                     # cdiv(C, 32) (TAIL_BITS)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    PROLOGUE: tl.constexpr,      # the forward loaded x' = act(x * in_scale + in_shift)
    IN_RELU: tl.constexpr,
    STORE_DX: tl.constexpr, STATS: tl.constexpr,   # write dx / d_in_scale, d_in_shift (needs PROLOGUE)
    GACC_ON_LOAD: tl.constexpr,  # g_acc = grad_y + d_mean/n + 2 d_m2 (y - mean) formed on load (conv -> BN train)
    RECOMPUTE_Y: tl.constexpr,   # (with GACC_ON_LOAD; 1x1, no padding, no bias) y = W x' recomputed from the row's
                                 # own x' (the forward's product, rounded as stored) instead of read
    TAIL: tl.constexpr,          # x = act_t(y_t * scale_t + shift_t + ...) of a block tail (no PROLOGUE): the
                                 # epilogue is the tail's backward, g = mask(dx' + side), its sums, g stored at dx
    TAIL_RELU: tl.constexpr, TAIL_SIDE: tl.constexpr, TAIL_RES_SUM: tl.constexpr,
    TAIL_BITS: tl.constexpr,     # (TAIL_RELU) the mask read from bits_ptr instead of x (1 bit an element, not 16)
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TAP_STEPS: tl.constexpr,     # every reduction step is full and lies in one live tap (tap_steps: K_g % BLOCK_K == 0)
    EVEN_N: tl.constexpr,        # C_g % BLOCK_N == 0: no output-column mask
    PACK: tl.constexpr,          # groups per program, 1 or 2 (_common.pack_groups; TAP_STEPS, a stored g_acc, BLOCK_N
                                 # = 2 C_g): a step's rows, bounds and offsets serve both groups' loads and products
                                 # (two exact products into two accumulators, joined for the epilogue)
    BLOCK_C: tl.constexpr,       # channels a step of the recomputed y (RECOMPUTE_Y)
    X_ONCE: tl.constexpr,        # (RECOMPUTE_Y) BLOCK_C >= C_g: the rows' x' tile (all C_g channels, the prologue
                                 # applied) formed once before the loop, each step's y one product with it
    PART_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,       # slots per step of the sums' reduction
    CHUNK: tl.constexpr,         # slots per chunk of the sums' two-level reduction (CHUNK_SLOTS)
):
    pid_m = tl.program_id(0)
    pid_gn = tl.program_id(1)
    num_n = tl.cdiv(C_g * PACK, BLOCK_N)
    grp = pid_gn // num_n * PACK   # the program's (first) group
    pid_n = pid_gn % num_n
    SUB_N: tl.constexpr = BLOCK_N // PACK   # one group's columns (PACK > 1: all C_g of them)

    # Rows: input positions (n, h, w) of one stride phase (a, b) = (h % sh, w % sw), i = h // sh, jj = w // sw:
    # the programs of a phase cover its M_a = N * cdiv(H - a, sh) * cdiv(W - b, sw) rows (tiles of the largest phase's
    # M_PH rows, phase (0, 0); the others' tails are masked).
    tiles_ph = tl.cdiv(M_PH, BLOCK_M)
    phase = pid_m // tiles_ph
    tile = pid_m % tiles_ph
    a_h = phase // STRIDE_W
    a_w = phase % STRIDE_W
    H_a = (H - a_h + STRIDE_H - 1) // STRIDE_H
    W_a = (W - a_w + STRIDE_W - 1) // STRIDE_W
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N * H_a * W_a
    # (divisors kept >= 1: a phase without rows (H < sh) has every row masked, and the compiled code must not divide
    # by zero on them: integer division by zero is undefined behaviour in LLVM)
    n = offs_m // tl.maximum(H_a * W_a, 1)
    ij = offs_m % tl.maximum(H_a * W_a, 1)
    i_h = ij // tl.maximum(W_a, 1)
    i_w = ij % tl.maximum(W_a, 1)
    h = a_h + STRIDE_H * i_h
    w = a_w + STRIDE_W * i_w
    g_rows = g_ptr + n.to(tl.int64) * sgn
    y_rows = y_ptr + n.to(tl.int64) * syn
    # The taps that reach this phase (p*sh = h + ph - r*dh): r = r0 + STEP_H t, t < T_H, and then
    # p = i_h + c_h - DQ_H t (_phase_taps); likewise s, q. Every other tap is dead for the whole phase: skipped.
    r0, T_H, c_h = _phase_taps(a_h, RSK // (S * K_g), PAD_H, STRIDE_H, DIL_H, STEP_H)
    s0, T_W, c_w = _phase_taps(a_w, S, PAD_W, STRIDE_W, DIL_W, STEP_W)
    if TAP_STEPS:   # the rows' (p, q) and pointers at the first live tap (out of the tensors where masked); P, Q
        # as unsigned bounds
        p_tap0 = i_h + c_h
        q_tap0 = i_w + c_w
        g_tap0 = g_rows + p_tap0.to(tl.int64) * sgh + q_tap0.to(tl.int64) * sgw
        y_tap0 = y_rows + p_tap0.to(tl.int64) * syh + q_tap0.to(tl.int64) * syw
        P_U = tl.cast(P, tl.uint32)
        Q_U = tl.cast(Q, tl.uint32)

    # Columns: input channels of group grp (PACK groups: grp's and grp + 1's, contiguous).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:   # every column block full: no column mask
        mask_n = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        mask_n = offs_n < C_g
    c = grp * C_g + offs_n
    if PACK == 1:
        offs_b = offs_n
        mask_b = mask_n
    else:   # the B tile of group grp (grp + 1's: K_g rows of the weight further)
        offs_b = tl.arange(0, SUB_N)
        mask_b = tl.full((SUB_N,), 1, tl.int1)
    INV_PTRS: tl.constexpr = TAP_STEPS and not RECOMPUTE_Y
    if INV_PTRS:
        # the operands' loop-invariant pointers (the group's first BLOCK_K channels at the rows' first live tap);
        # a step adds one scalar offset (its tap and channels): one 64-bit add per vector, not a product per row
        # (fp16 sm_90, a 128-channel 3x3 layer's 128 x 128 x 64 loop: 196 -> 168 SASS a step on 8 warps, 248 -> 178
        # on 4; not with y recomputed: its loop holds the x' and w tiles, and grew)
        k_inv = (grp * K_g + tl.arange(0, BLOCK_K)).to(tl.int64)
        a_inv = g_tap0[:, None] + (k_inv * sgc)[None, :]
        y_inv = y_tap0[:, None] + (k_inv * syc)[None, :]
        b_inv = w_ptr + (k_inv * swk)[:, None] + (offs_b * swc)[None, :]

    if X_ONCE:
        # the x' tile every step's y is recomputed from (a 1x1 conv without padding reads x at its output's own
        # input position): loaded and formed once, not at every step (the prologue's per-element work was most of
        # the loop)
        cr_once = tl.arange(0, BLOCK_C)
        x_once = _x_prime_tile(x_ptr, in_scale_ptr, in_shift_ptr,
                               n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw,
                               grp * C_g + cr_once, mask_m, cr_once < C_g, sxc, PROLOGUE, IN_RELU, UPCAST)

    acc = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    if PACK == 2:
        acc1 = tl.zeros_like(acc)
    # TAP_STEPS: the step's live tap (t_t, u_t) and first channel k0, carried from step to step as scalars
    k0 = 0
    t_t = 0
    u_t = 0
    for j0 in range(0, T_H * T_W * K_g, BLOCK_K):
        if TAP_STEPS:
            # The step lies in one live tap (r0 + STEP_H t_t, s0 + STEP_W u_t), channels k0 .. k0 + BLOCK_K - 1:
            # bounds and offsets per row, one add per element.
            k_l = k0 + tl.arange(0, BLOCK_K)
            mask_j = tl.full((BLOCK_K,), 1, tl.int1)   # every step full: the rows' bounds are the whole mask
            k = grp * K_g + k_l
            r = r0 + STEP_H * t_t
            s = s0 + STEP_W * u_t
            # the tap moves every row by the same (dp, dq): a scalar offset to the rows' loop-invariant pointers;
            # one unsigned compare per dimension bounds p and q (a negative index wraps to >= 2^31 > P)
            dp = -DQ_H * t_t
            dq = -DQ_W * u_t
            row_ok = mask_m & ((p_tap0 + dp).to(tl.uint32) < P_U) & ((q_tap0 + dq).to(tl.uint32) < Q_U)
            valid = row_ok[:, None] & mask_j[None, :]
            if INV_PTRS:
                k0_64 = tl.cast(k0, tl.int64)
                a_ptrs = a_inv + (dp.to(tl.int64) * sgh + dq.to(tl.int64) * sgw + k0_64 * sgc)
                y_ptrs = y_inv + (dp.to(tl.int64) * syh + dq.to(tl.int64) * syw + k0_64 * syc)
                b_ptrs = b_inv + (k0_64 * swk + r.to(tl.int64) * swr + s.to(tl.int64) * sws)
            else:
                a_ptrs = ((g_tap0 + (dp.to(tl.int64) * sgh + dq.to(tl.int64) * sgw))[:, None]
                          + (k.to(tl.int64) * sgc)[None, :])
                y_ptrs = ((y_tap0 + (dp.to(tl.int64) * syh + dq.to(tl.int64) * syw))[:, None]
                          + (k.to(tl.int64) * syc)[None, :])
                b_ptrs = (w_ptr + (k.to(tl.int64) * swk + r * swr + s * sws)[:, None] + (offs_b * swc)[None, :])
            k0, u_t, t_t = advance_tap(k0, u_t, t_t, BLOCK_K, K_g, T_W)
        else:
            # Reduction index j = (t, u, k_local), k fastest, over the phase's live taps (r0 + STEP_H t,
            # s0 + STEP_W u): a step may span taps (narrow groups).
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < T_H * T_W * K_g
            k = grp * K_g + offs_j % K_g
            tu = offs_j // K_g
            # (T_W >= 1 whenever the loop runs; the pipeliner may hoist this index math out of a loop of no step)
            t = tu // tl.maximum(T_W, 1)
            u = tu % tl.maximum(T_W, 1)
            r = r0 + STEP_H * t
            s = s0 + STEP_W * u
            p = i_h[:, None] + (c_h - DQ_H * t)[None, :]
            q = i_w[:, None] + (c_w - DQ_W * u)[None, :]
            valid = mask_m[:, None] & mask_j[None, :] & (p >= 0) & (q >= 0) & (p < P) & (q < Q)
            a_ptrs = (g_rows[:, None] + (k.to(tl.int64) * sgc)[None, :] + p.to(tl.int64) * sgh
                      + q.to(tl.int64) * sgw)
            y_ptrs = (y_rows[:, None] + (k.to(tl.int64) * syc)[None, :] + p.to(tl.int64) * syh
                      + q.to(tl.int64) * syw)
            b_ptrs = (w_ptr + (k.to(tl.int64) * swk + r * swr + s * sws)[:, None] + (offs_n * swc)[None, :])
        a = tl.load(a_ptrs, mask=valid, other=0.0)
        b = tl.load(b_ptrs, mask=mask_j[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        if PACK == 2:   # group grp + 1: K_g channels of g_acc and K_g filters further, the same rows and masks
            a1 = tl.load(a_ptrs + K_g * sgc, mask=valid, other=0.0)
            b1 = tl.load(b_ptrs + K_g * swk, mask=mask_j[:, None] & mask_b[None, :], other=0.0)
            if UPCAST:
                a1 = a1.to(tl.float32)
                b1 = b1.to(tl.float32)
            acc1 = tl.dot(a1, b1, acc1, input_precision=PRECISION)
        if GACC_ON_LOAD:
            # k changes along j: the per-channel terms are gathered per step (BLOCK_K values, cached loads), as the
            # wgrad computed them (not recomputed here: BN's finalize backward per step was ~1/4 of the loop's SASS)
            mean = tl.load(terms_ptr + k, mask=mask_j, other=0.0)
            c0 = tl.load(terms_ptr + stats_row + k, mask=mask_j, other=0.0)
            c1 = tl.load(terms_ptr + 2 * stats_row + k, mask=mask_j, other=0.0)
            if RECOMPUTE_Y:
                # y[m, k] = sum_c x'[m, c] w[k, c] over the group's C_g channels, x' of this tile's rows (a 1x1 conv
                # without padding reads x at its output's own input position), BLOCK_C channels a step; rounded as
                # the forward stored it. X_ONCE: one product with the x' tile formed before the loop; else x' is
                # loaded again at every step (L1 / L2 hits; fp32 tiles of all C_g channels spilled).
                yacc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
                x_rows = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
                if X_ONCE:
                    wt = tl.load(w_ptr + (k.to(tl.int64) * swk)[None, :] + (cr_once * swc)[:, None],
                                 mask=(cr_once < C_g)[:, None] & mask_j[None, :], other=0.0)
                    if UPCAST:
                        wt = wt.to(tl.float32)
                    yacc = tl.dot(x_once, wt, yacc, input_precision=PRECISION)
                for cr0 in range(0, C_g if not X_ONCE else 0, BLOCK_C):
                    cr = cr0 + tl.arange(0, BLOCK_C)
                    xt = _x_prime_tile(x_ptr, in_scale_ptr, in_shift_ptr, x_rows, grp * C_g + cr, mask_m, cr < C_g,
                                       sxc, PROLOGUE, IN_RELU, UPCAST)
                    wt = tl.load(w_ptr + (k.to(tl.int64) * swk)[None, :] + (cr * swc)[:, None],
                                 mask=(cr < C_g)[:, None] & mask_j[None, :], other=0.0)
                    if UPCAST:
                        wt = wt.to(tl.float32)
                    yacc = tl.dot(xt, wt, yacc, input_precision=PRECISION)
                yv = yacc.to(w_ptr.dtype.element_ty).to(tl.float32)
            else:
                yv = tl.load(y_ptrs, mask=valid, other=0.0).to(tl.float32)
            af = a.to(tl.float32) * tl.load(gys_ptr + k, mask=mask_j, other=0.0)[None, :]
            a = stats_grad_on_load(af, yv, c0[None, :], c1[None, :], mean[None, :], valid)
            a = a.to(w_ptr.dtype.element_ty)   # g_acc in x.dtype, as the epilogue kernel stores it
        if UPCAST:
            a = a.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if PACK == 2:   # (BLOCK_M, 2 C_g): group grp's columns, then grp + 1's
        acc = tl.reshape(tl.permute(tl.join(acc, acc1), (0, 2, 1)), (BLOCK_M, BLOCK_N))

    mask = mask_m[:, None] & mask_n[None, :]
    n64 = n.to(tl.int64)
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    c64 = c.to(tl.int64)
    gm = acc
    if PROLOGUE:
        scale = tl.load(in_scale_ptr + c, mask=mask_n, other=0.0).to(tl.float32)
        if IN_RELU or STATS:
            xv = tl.load(x_ptr + (n64 * sxn + h64 * sxh + w64 * sxw)[:, None] + (c64 * sxc)[None, :],
                         mask=mask, other=0.0).to(tl.float32)
        if IN_RELU:
            pre = xv * scale[None, :] + tl.load(in_shift_ptr + c, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            gm = tl.where(pre <= 0, 0.0, gm)
        if STATS:
            gm_m = tl.where(mask, gm, 0.0)
            # Each phase owns cdiv(M_PH, PART_M) slots (the layout does not depend on the config: store_part)
            part_ph = part_ptr + (phase * tl.cdiv(M_PH, PART_M)).to(tl.int64) * 2 * C
            # centred on each channel's first value (reference.sum_centred; its x0 * sum g added with the totals)
            x0 = channel_centre(x_ptr, c, mask_n, sxc)
            store_part(part_ph, tile, M_PH, 2 * C, c, mask_n, tl.sum(gm_m * (xv - x0[None, :]), axis=0), PART_M,
                       BLOCK_M)
            store_part(part_ph + C, tile, M_PH, 2 * C, c, mask_n, tl.sum(gm_m, axis=0), PART_M, BLOCK_M)
        gm = gm * scale[None, :]
    if TAIL:
        # The tail's backward (bn_apply_backward of x = act_t(y_t * scale_t + shift_t + residual * rs + rb), the
        # gradient of x being dx' + side): g = where(x <= 0, 0, dx' + side) (torch's threshold_backward, a NaN x
        # passes), stored at dx; sums g*y_t -> d_scale_t, g -> d_shift_t (and g*residual -> d_rs).
        rows = n64 * sxn + h64 * sxh + w64 * sxw
        if TAIL_SIDE:
            gm += tl.load(side_ptr + (n64 * ssn + h64 * ssh + w64 * ssw)[:, None] + (c64 * ssc)[None, :],
                          mask=mask, other=0.0).to(tl.float32)
        if TAIL_RELU:
            if TAIL_BITS:
                word = tl.load(bits_ptr + ((n64 * H + h64) * W + w64)[:, None] * n_words + (c // 32)[None, :],
                               mask=mask, other=0)
                gm = tl.where(((word >> (c % 32)[None, :]) & 1) == 0, 0.0, gm)
            else:
                xo = tl.load(x_ptr + rows[:, None] + (c64 * sxc)[None, :], mask=mask, other=0.0)
                gm = tl.where(xo <= 0, 0.0, gm)
        gm_m = tl.where(mask, gm, 0.0)
        n_sums = 3 if TAIL_RES_SUM else 2
        part_ph = part_ptr + (phase * tl.cdiv(M_PH, PART_M)).to(tl.int64) * n_sums * C
        yt = tl.load(yt_ptr + (n64 * stn + h64 * sth + w64 * stw)[:, None] + (c64 * stc)[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        y0 = channel_centre(yt_ptr, c, mask_n, stc)   # centred as the prologue's sums
        store_part(part_ph, tile, M_PH, n_sums * C, c, mask_n, tl.sum(gm_m * (yt - y0[None, :]), axis=0), PART_M,
                   BLOCK_M)
        store_part(part_ph + C, tile, M_PH, n_sums * C, c, mask_n, tl.sum(gm_m, axis=0), PART_M, BLOCK_M)
        if TAIL_RES_SUM:
            rv = tl.load(res_ptr + (n64 * srn + h64 * srh + w64 * srw)[:, None] + (c64 * src)[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            r0 = channel_centre(res_ptr, c, mask_n, src)
            store_part(part_ph + 2 * C, tile, M_PH, n_sums * C, c, mask_n, tl.sum(gm_m * (rv - r0[None, :]), axis=0),
                       PART_M, BLOCK_M)
    if STORE_DX:
        tl.store(dx_ptr + (n64 * sdn + h64 * sdh + w64 * sdw)[:, None] + (c64 * sdc)[None, :],
                 gm.to(dx_ptr.dtype.element_ty), mask=mask)
    if (PROLOGUE and STATS) or TAIL:
        # Two-level sums of the slots (after the dx store: the accumulator is dead, its registers free for them); the
        # centred sums completed with the centres' tensors: the tail's y (and residual), else x
        if TAIL:
            v_ptr = yt_ptr
            s_v = stc
        else:
            v_ptr = x_ptr
            s_v = sxc
        _dgrad_prologue_sums(part_ptr, dscale_ptr, dshift_ptr, drs_ptr, sem_ptr, v_ptr, s_v, res_ptr, src,
                             grp * C_g + pid_n * BLOCK_N, tl.minimum(C_g * PACK - pid_n * BLOCK_N, BLOCK_N), tile,
                             tiles_ph, phase, tl.cdiv(M_PH, PART_M), STRIDE_H * STRIDE_W, C, TAIL_RES_SUM, PART_M,
                             BLOCK_M, BLOCK_S, BLOCK_N, CHUNK)


@triton.jit
def _x_prime_tile(x_ptr, in_scale_ptr, in_shift_ptr, rows, c, mask_m, mask_c, sxc,
                  PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, UPCAST: tl.constexpr):
    """x' = act(x * in_scale + in_shift) (or x) at row offsets `rows` (int64: n sxn + h sxh + w sxw) and channels c,
    in x's dtype as the forward's dot read it (fp32 with UPCAST); 0 where masked."""
    xm = mask_m[:, None] & mask_c[None, :]
    xt = tl.load(x_ptr + rows[:, None] + (c.to(tl.int64) * sxc)[None, :], mask=xm, other=0.0)
    if PROLOGUE:
        xt = apply_prologue(xt, in_scale_ptr, in_shift_ptr, c, mask_c, xm, IN_RELU)
    if UPCAST:
        xt = xt.to(tl.float32)
    return xt


@triton.jit(noinline=True)
def _dgrad_prologue_sums(part_ptr, dscale_ptr, dshift_ptr, third_ptr, sem_ptr, v_ptr, s_v, r_ptr, s_r, c0, n_cols,
                         tile, tiles_ph, phase, slots_ph, phases, C, THIRD: tl.constexpr, PART_M: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """d_in_scale, d_in_shift (the tail's d_scale, d_shift; THIRD: and d_residual_scale) of columns c0 .. c0 +
    n_cols - 1 from the (phases * slots_ph, 2 or 3, C) partials [sum g (v - v0), sum g, sum g (r - r0)], in two levels
    (sum_chunks_if_last: chunks of CHUNK slots within each stride phase, then the chunks; level-2 slots after the
    slots), written by the last program (a function of its own: its registers do not add to the GEMM's), the centred
    sums completed: sum g v = sum g (v - v0) + v0 sum g, v0 the channel's first value of v (channel stride s_v; r, s_r
    the residual's), as reference.sum_centred."""
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n_cols
    c = c0 + offs
    n_sums = 3 if THIRD else 2
    chunk, arrivals, first, count = slot_chunk(tile, tiles_ph, phase, slots_ph, CHUNK * PART_M // BLOCK_M, CHUNK)
    level2 = part_ptr + tl.cast(phases * slots_ph, tl.int64) * n_sums * C
    d_scale, d_shift, third, final = sum_chunks_if_last(
        part_ptr, level2, n_sums * C, C, sem_ptr, tl.program_id(1), tl.num_programs(1),
        phases * tl.cdiv(slots_ph, CHUNK), chunk, arrivals, first, count, c, mask, True, True, THIRD, BLOCK_S,
        BLOCK_N)
    if final:
        v0 = channel_centre(v_ptr, c, mask, s_v)
        d_scale += tl.where(v0 == 0.0, 0.0, v0 * d_shift)
        tl.store(dscale_ptr + c, d_scale.to(dscale_ptr.dtype.element_ty), mask=mask)
        tl.store(dshift_ptr + c, d_shift.to(dshift_ptr.dtype.element_ty), mask=mask)
        if THIRD:
            r0 = channel_centre(r_ptr, c, mask, s_r)
            third += tl.where(r0 == 0.0, 0.0, r0 * d_shift)
            tl.store(third_ptr + c, third.to(third_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# 3. wgrad: grouped implicit GEMM over M = N*P*Q, prologue recomputed on load, split-M fp32 partials
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NOT_SPECIALIZED + ["M_PER_SPLIT", "SPLIT_CHUNK", "PQ_MAGIC", "PQ_SHIFT", "Q_MAGIC",
                                                  "Q_SHIFT", "sdk", "sdc", "sdr", "sds"])
def _conv_wgrad_kernel(
    g_ptr,          # g_acc (N, K, P, Q), any strides; grad_y with GACC_ON_LOAD
    x_ptr,          # forward input (N, C, H, W), any strides
    w_ptr,          # RECOMPUTE_Y: the weight (K, C_g, 1, 1), any strides; else unused
    in_scale_ptr,   # (C,) contiguous or unused
    in_shift_ptr,   # (C,) contiguous or unused
    y_ptr,          # GACC_ON_LOAD: the forward output y (N, K, P, Q), any strides; else unused
    gscale_ptr,     # GACC_ON_LOAD: grad_scale (K,) fp32 contiguous (cached zeros when absent); else unused
    gshift_ptr,     # GACC_ON_LOAD: grad_shift (K,) fp32 contiguous (cached zeros when absent); else unused
    stats_ptr,      # GACC_ON_LOAD: the forward's stats (2, K) fp32 contiguous [mean, m2]; else unused
    bnw_ptr,        # GACC_ON_LOAD: BN weight (K,) contiguous (cached ones when absent); else unused
    gys_ptr,        # GACC_ON_LOAD: (K,) fp32 contiguous, grad_y's per-channel factor on load (cached ones when
                    # absent: one flag fewer, one compile fewer per layer kind); else unused
    terms_ptr,      # out (GACC_ON_LOAD): (3, K) fp32 contiguous [mean, d_mean/n, 2 d_m2] per channel (the programs of
                    # j tile 0, split 0), for the dgrad launched after this kernel; else unused
    gacc_ptr,       # out (STORE_GACC): g_acc (N, K, P, Q) channels_last in x's dtype, as formed on load (the programs
                    # of j tile 0), for the dgrad launched after this kernel; else unused
    dw_ptr,         # out: dw (K, C_g, R, S) in weight's dtype, strides (sdk, sdc, sdr, sds)
    part_ptr,       # out: (SPLIT + chunks, K, RSC) fp32 contiguous, column j = (r, s, c_local) with c fastest: the
                    # splits' partials, then the chunks' level-2 partials; unused if SPLIT = 1
    sem_ptr,        # (tiles * (1 + chunks),) int32 counters (tiles = k x j tiles x groups), 0 at launch (SPLIT > 1),
                    # or unused
    dbnw_ptr,       # out (GACC_ON_LOAD): d_bn_weight (K,) in the BN weight's dtype; else unused
    dbnb_ptr,       # out (GACC_ON_LOAD): d_bn_bias (K,) fp32; else unused
    dbias_ptr,      # out (BIAS_GRAD): the conv bias's gradient d_bias (K,) in the bias's dtype; else unused
    bpart_ptr,      # out (BIAS_GRAD, SPLIT > 1): (SPLIT + chunks, K) fp32 contiguous partial sums of d_bias (the
                    # chunks' after the splits'); else unused
    H, W, K, P, Q, M,            # input height/width, output channels, output height/width, M = N*P*Q
    C_g, K_g, S, RSC,            # channels per group (in/out), filter width, R*S*C_g
    M_PER_SPLIT,                 # rows of M per split (a multiple of BLOCK_M)
    SPLIT_CHUNK,                 # splits per chunk of the two-level sum of the split partials (split_chunk)
    PQ_MAGIC, PQ_SHIFT, Q_MAGIC, Q_SHIFT,   # divisor_magic(P * Q), divisor_magic(Q) (fast_div)
    count, inv_n, eps,           # GACC_ON_LOAD: n = M (float), 1 / n, BN epsilon
    sgn, sgc, sgh, sgw,          # g_acc (grad_y) strides
    syn, syc, syh, syw,          # y strides (GACC_ON_LOAD)
    sxn, sxc, sxh, sxw,          # x strides
    sdk, sdc, sdr, sds,          # dw strides (the weight's memory format)
    swk, swc,                    # weight strides (RECOMPUTE_Y)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    PROLOGUE: tl.constexpr,      # x' = x * in_scale + in_shift (then ReLU if IN_RELU)
    IN_RELU: tl.constexpr,
    GACC_ON_LOAD: tl.constexpr,  # g_acc = grad_y + d_mean/n + 2 d_m2 (y - mean) formed on load (conv -> BN train);
                                 # the programs of j tile 0, split 0 write d_bn_weight, d_bn_bias of their k rows
    RECOMPUTE_Y: tl.constexpr,   # (with GACC_ON_LOAD; 1x1, no padding, no bias) y = W x' recomputed from the rows'
                                 # x' instead of read
    Y_FROM_B: tl.constexpr,      # (RECOMPUTE_Y) BLOCK_K >= C_g: the step's x' tile (B, every channel) is the one y
                                 # is recomputed from: one product with it, not a second load of x'
    BIAS_GRAD: tl.constexpr,     # (with GACC_ON_LOAD) the programs of j tile 0 sum g_acc over m into d_bias
    STORE_GACC: tl.constexpr,    # (with GACC_ON_LOAD) the programs of j tile 0 store the g_acc they form at gacc_ptr
    FLAT_G: tl.constexpr,        # g_acc's (and y's) rows dense over (n, p, q): row m at m * sgw (m * syw)
    FLAT_X: tl.constexpr,        # a 1x1 conv, stride 1, no padding, x's rows dense over (n, h, w): row m at m * sxw
    ALIGNED_ROWS: tl.constexpr,  # (rows split into (n, p, q)) P*Q % BLOCK_M == 0 and Q divides BLOCK_M or BLOCK_M
                                 # divides Q: a step's rows lie in one image, at (p0 + i // Q, q0 + i % Q) from its
                                 # first row (p0, q0): the rows' split is loop-invariant, the step's a scalar one
    WHOLE_IMAGES: tl.constexpr,  # (instead of ALIGNED_ROWS) BLOCK_M a multiple of P*Q: a step's rows are whole images,
                                 # row i at (n_s + i // PQ, i % PQ // Q, i % Q), n_s = m0 / PQ: every row's (p, q)
                                 # and its bounds loop-invariant, the step's image a scalar
    TAP_ROWS: tl.constexpr,      # (ALIGNED_ROWS or WHOLE_IMAGES, not FLAT_X) BLOCK_K divides C_g: a j tile lies in
                                 # one filter tap, so x's offsets are the step's scalar plus loop-invariant row and
                                 # column ones, and its bounds per row
    TRANS_ACC: tl.constexpr,     # dw^T = x'^T g_acc: the j tile is the MMA's M, the k tile its N (a 32-row k tile of
                                 # a narrow group's 32 channels on wgmma instead of a half-masked 64-row one)
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,   # M % BLOCK_M, K_g % BLOCK_N, RSC % BLOCK_K
                                                                         # == 0: no mask along that dimension
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,   # tiles of m, k, j
):
    pid_nk = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    num_k = tl.cdiv(K_g, BLOCK_N)
    pid_k = pid_nk % num_k
    pid_j = pid_nk // num_k

    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    # EVEN_N, EVEN_K, EVEN_M: tiles that divide K_g, R*S*C_g, M need no mask along that dimension (the loads'
    # per-element predicates: ~1/5 of the loop's instructions with all three masks)
    mask_k = tl.full((BLOCK_N,), 1, tl.int1) if EVEN_N else offs_k < K_g
    k = grp * K_g + offs_k
    offs_j = pid_j * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_j = tl.full((BLOCK_K,), 1, tl.int1) if EVEN_K else offs_j < RSC
    c_l = offs_j % C_g
    rs = offs_j // C_g
    r = rs // S
    s = rs % S
    c = grp * C_g + c_l
    if PROLOGUE:
        scale = tl.load(in_scale_ptr + c, mask=mask_j, other=0.0).to(tl.float32)
        shift = tl.load(in_shift_ptr + c, mask=mask_j, other=0.0).to(tl.float32)
    if GACC_ON_LOAD:
        mean, c0, c1, d_bn_w, d_bn_b = _bn_grad_terms(gscale_ptr, gshift_ptr, stats_ptr, bnw_ptr, k, mask_k, K,
                                                      count, inv_n, eps)
        if (pid_j == 0) & (split == 0):
            tl.store(dbnw_ptr + k, d_bn_w.to(dbnw_ptr.dtype.element_ty), mask=mask_k)
            tl.store(dbnb_ptr + k, d_bn_b, mask=mask_k)
            tl.store(terms_ptr + k, mean, mask=mask_k)
            tl.store(terms_ptr + K + k, c0, mask=mask_k)
            tl.store(terms_ptr + 2 * K + k, c1, mask=mask_k)
        gys = tl.load(gys_ptr + k, mask=mask_k, other=0.0)

    if TRANS_ACC:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if BIAS_GRAD:
        d_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    # Dense operands are addressed as the step's scalar offset (m0 times the row stride) plus loop-invariant
    # offsets of the tile's rows and columns: one 64-bit add per vector a step, not a product per row (not with y
    # recomputed: its loop holds the x' and w tiles' registers, the invariant offsets made it longer)
    i_m = tl.arange(0, BLOCK_M)
    i_m64 = i_m.to(tl.int64)
    INV_ROWS: tl.constexpr = not RECOMPUTE_Y
    if FLAT_G and INV_ROWS:
        g_inv = (k.to(tl.int64) * sgc)[:, None] + (i_m64 * sgw)[None, :]
        y_inv = (k.to(tl.int64) * syc)[:, None] + (i_m64 * syw)[None, :]
        gacc_inv = (i_m64 * K)[None, :] + k.to(tl.int64)[:, None]   # STORE_GACC: channels_last, row m at m * K
    if FLAT_X and INV_ROWS:
        x_inv = (i_m64 * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :]
    if ALIGNED_ROWS:
        p_off = fast_div(i_m, Q, Q_MAGIC, Q_SHIFT)
        q_off = i_m - p_off * Q
    if WHOLE_IMAGES:
        n_off = fast_div(i_m, P * Q, PQ_MAGIC, PQ_SHIFT)
        p_off = fast_div(i_m - n_off * (P * Q), Q, Q_MAGIC, Q_SHIFT)
        q_off = i_m - n_off * (P * Q) - p_off * Q
    H_U = tl.cast(H, tl.uint32)
    W_U = tl.cast(W, tl.uint32)
    # j tiles spanning taps: the tile's input positions relative to the step's first row, (row, column)
    # loop-invariant (a 64-channel 3x3 layer's 128-deep j tiles, fp16 sm_90: 359 -> 304 SASS a step; the 32-channel
    # one's 293 -> 248, with a prologue 414 -> 360; the stem's 446 -> 314). (With a prologue they once spilled 20 B
    # beside its x' tile, Triton 3.9; not since the prologue masks by an add: prologue_values)
    if (ALIGNED_ROWS or WHOLE_IMAGES) and not TAP_ROWS and not FLAT_X:
        hh_inv = (p_off * STRIDE_H - PAD_H)[:, None] + (r * DIL_H)[None, :]
        ww_inv = (q_off * STRIDE_W - PAD_W)[:, None] + (s * DIL_W)[None, :]
        xj_inv = hh_inv.to(tl.int64) * sxh + ww_inv.to(tl.int64) * sxw + (c.to(tl.int64) * sxc)[None, :]
        if WHOLE_IMAGES:   # bounds and offsets the same at every step
            xj_inv += (n_off.to(tl.int64) * sxn)[:, None]
            cols_in = mask_j[None, :] & (hh_inv.to(tl.uint32) < H_U) & (ww_inv.to(tl.uint32) < W_U)
    if TAP_ROWS:   # the tile's tap (r, s): the rows' input positions and offsets relative to the step's first row
        tap = (pid_j * BLOCK_K) // C_g
        h_inv = p_off * STRIDE_H + ((tap // S) * DIL_H - PAD_H)
        w_inv = q_off * STRIDE_W + ((tap % S) * DIL_W - PAD_W)
        x_row_inv = h_inv.to(tl.int64) * sxh + w_inv.to(tl.int64) * sxw
        x_col = c.to(tl.int64) * sxc
        if WHOLE_IMAGES:   # the rows' image offsets and bounds, the same at every step
            x_inv = (x_row_inv + n_off.to(tl.int64) * sxn)[:, None] + x_col[None, :]
            rows_in = (h_inv.to(tl.uint32) < H_U) & (w_inv.to(tl.uint32) < W_U)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + i_m
        mask_m = tl.full((BLOCK_M,), 1, tl.int1) if EVEN_M else offs_m < m_end
        m64 = offs_m.to(tl.int64)
        m0_64 = tl.cast(m0, tl.int64)
        if WHOLE_IMAGES:
            # the step's first image (a scalar); its rows' (p, q) are loop-invariant
            n_s = fast_div(tl.cast(m0, tl.int32), P * Q, PQ_MAGIC, PQ_SHIFT)
            n64 = (n_off + n_s).to(tl.int64)
            p = p_off
            q = q_off
        elif ALIGNED_ROWS:
            # the step's first row split once (scalars), then the rows' loop-invariant offsets (fp16 sm_90, a 3x3
            # layer's 64 x 64 x 128 loop on 8 warps: 428 -> 388 SASS; 335 with TAP_ROWS)
            n_s = fast_div(tl.cast(m0, tl.int32), P * Q, PQ_MAGIC, PQ_SHIFT)
            pq_s = m0 - n_s * (P * Q)
            p_s = fast_div(pq_s, Q, Q_MAGIC, Q_SHIFT)
            n = tl.zeros((BLOCK_M,), tl.int32) + n_s
            p = p_off + p_s
            q = q_off + (pq_s - p_s * Q)
            n64 = n.to(tl.int64)
        elif not (FLAT_G and FLAT_X):
            # (n, p, q) of the rows without a division: fast_div by P*Q and Q (the divisions were ~1/3 of the loop);
            # rows dense over (n, p, q) need none (FLAT_G, FLAT_X: 1x1 loop 470 -> 252 SASS, fp16 sm_90)
            n = fast_div(offs_m, P * Q, PQ_MAGIC, PQ_SHIFT)
            pq = offs_m - n * (P * Q)
            p = fast_div(pq, Q, Q_MAGIC, Q_SHIFT)
            q = pq - p * Q
            n64 = n.to(tl.int64)
        # B = x' tile (BLOCK_M x BLOCK_K), gathered with the prologue, zero padding
        if FLAT_X:
            in_bounds = mask_m[:, None] & mask_j[None, :]
            if INV_ROWS:
                b_ptrs = x_ptr + m0_64 * sxw + x_inv
            else:
                b_ptrs = x_ptr + (m64 * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :]
        elif TAP_ROWS and WHOLE_IMAGES:
            in_bounds = (mask_m & rows_in)[:, None] & mask_j[None, :]
            b_ptrs = x_ptr + n_s.to(tl.int64) * sxn + x_inv
        elif TAP_ROWS:
            # one unsigned compare per dimension and row (a negative index wraps to >= 2^31 > H)
            ph_s = p_s * STRIDE_H
            pw_s = (pq_s - p_s * Q) * STRIDE_W
            row_ok = mask_m & ((h_inv + ph_s).to(tl.uint32) < H_U) & ((w_inv + pw_s).to(tl.uint32) < W_U)
            in_bounds = row_ok[:, None] & mask_j[None, :]
            step = n_s.to(tl.int64) * sxn + ph_s.to(tl.int64) * sxh + pw_s.to(tl.int64) * sxw
            b_ptrs = x_ptr + step + x_row_inv[:, None] + x_col[None, :]
        elif WHOLE_IMAGES:
            in_bounds = mask_m[:, None] & cols_in
            b_ptrs = x_ptr + n_s.to(tl.int64) * sxn + xj_inv
        elif ALIGNED_ROWS:
            ph_s = p_s * STRIDE_H
            pw_s = (pq_s - p_s * Q) * STRIDE_W
            in_bounds = ((mask_m[:, None] & mask_j[None, :]) & ((hh_inv + ph_s).to(tl.uint32) < H_U)
                         & ((ww_inv + pw_s).to(tl.uint32) < W_U))
            step = n_s.to(tl.int64) * sxn + ph_s.to(tl.int64) * sxh + pw_s.to(tl.int64) * sxw
            b_ptrs = x_ptr + step + xj_inv
        else:
            hh = (p * STRIDE_H - PAD_H)[:, None] + (r * DIL_H)[None, :]
            ww = (q * STRIDE_W - PAD_W)[:, None] + (s * DIL_W)[None, :]
            in_bounds = mask_m[:, None] & mask_j[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            b_ptrs = (x_ptr + (n64 * sxn)[:, None] + (c.to(tl.int64) * sxc)[None, :]
                      + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw)
        b = tl.load(b_ptrs, mask=in_bounds, other=0.0)
        if PROLOGUE:
            b = prologue_values(b, scale, shift, in_bounds, IN_RELU)
        if UPCAST:
            b = b.to(tl.float32)
        # A = g_acc^T tile (BLOCK_N x BLOCK_M)
        mask_a = mask_k[:, None] & mask_m[None, :]
        if FLAT_G and INV_ROWS:
            a_ptrs = g_ptr + m0_64 * sgw + g_inv
        elif FLAT_G:
            a_ptrs = g_ptr + (k.to(tl.int64) * sgc)[:, None] + (m64 * sgw)[None, :]
        else:
            a_ptrs = g_ptr + (k.to(tl.int64) * sgc)[:, None] + (n64 * sgn + p.to(tl.int64) * sgh
                                                               + q.to(tl.int64) * sgw)[None, :]
        a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        if GACC_ON_LOAD:
            if RECOMPUTE_Y:
                # y[k, m] = sum_c w[k, c] x'[m, c] over the group's C_g channels, BLOCK_K a step, x' at the rows'
                # input positions (1x1, no padding: (p*sh, q*sw)); rounded as stored. Y_FROM_B: one product with the
                # step's B tile (every channel: 178 -> 152, 144 -> 94 us modelled, the model's narrow expansions with a
                # prologue, fp16 sm_90); else loaded again, BLOCK_K channels a step (L1 / L2 hits: kept across the
                # loop, w's tile made TF32 spill).
                yacc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                if FLAT_X:
                    x_rows = m64 * sxw
                else:   # x at the rows' input positions (p sh, q sw)
                    x_rows = (n64 * sxn + (p * STRIDE_H).to(tl.int64) * sxh + (q * STRIDE_W).to(tl.int64) * sxw)
                if Y_FROM_B:   # (j = c: a 1x1 conv)
                    wk = tl.load(w_ptr + (k.to(tl.int64) * swk)[:, None] + (offs_j * swc)[None, :],
                                 mask=mask_k[:, None] & mask_j[None, :], other=0.0)
                    if UPCAST:
                        wk = wk.to(tl.float32)
                    yacc = tl.dot(wk, tl.trans(b), yacc, input_precision=PRECISION)
                for cr0 in range(0, C_g if not Y_FROM_B else 0, BLOCK_K):
                    cr = cr0 + tl.arange(0, BLOCK_K)
                    xt = _x_prime_tile(x_ptr, in_scale_ptr, in_shift_ptr, x_rows, grp * C_g + cr, mask_m,
                                       cr < C_g, sxc, PROLOGUE, IN_RELU, UPCAST)
                    wk = tl.load(w_ptr + (k.to(tl.int64) * swk)[:, None] + (cr * swc)[None, :],
                                 mask=mask_k[:, None] & (cr < C_g)[None, :], other=0.0)
                    if UPCAST:
                        wk = wk.to(tl.float32)
                    yacc = tl.dot(wk, tl.trans(xt), yacc, input_precision=PRECISION)
                yv = yacc.to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                if FLAT_G:
                    y_ptrs = y_ptr + m0_64 * syw + y_inv
                else:
                    y_rows = n64 * syn + p.to(tl.int64) * syh + q.to(tl.int64) * syw
                    y_ptrs = y_ptr + (k.to(tl.int64) * syc)[:, None] + y_rows[None, :]
                yv = tl.load(y_ptrs, mask=mask_a, other=0.0).to(tl.float32)
            af = a.to(tl.float32) * gys[:, None]
            a = stats_grad_on_load(af, yv, c0[:, None], c1[:, None], mean[:, None], mask_a)
            a = a.to(x_ptr.dtype.element_ty)   # g_acc in x.dtype, as the epilogue kernel stores it
            if BIAS_GRAD:
                if pid_j == 0:   # the values the dot consumes (A is k x m: a row sum per k)
                    d_bias += tl.sum(a.to(tl.float32), axis=1)
            if STORE_GACC:
                if pid_j == 0:   # channels_last: row m at m * K
                    if FLAT_G and INV_ROWS:
                        tl.store(gacc_ptr + m0_64 * K + gacc_inv, a, mask=mask_a)
                    else:
                        tl.store(gacc_ptr + (m64 * K)[None, :] + k.to(tl.int64)[:, None], a, mask=mask_a)
        if UPCAST:
            a = a.to(tl.float32)
        acc = dot_acc(a, b, acc, TRANS_ACC, PRECISION)
    if TRANS_ACC:
        acc = tl.trans(acc)

    # dw[k, c_l, r, s] through dw's strides (the weight's memory format); j = (r*S + s)*C_g + c_l
    mask = mask_k[:, None] & mask_j[None, :]
    dw_offs = (k.to(tl.int64) * sdk)[:, None] + (c_l.to(tl.int64) * sdc + r * sdr + s * sds)[None, :]
    n_split = tl.num_programs(2)
    if n_split == 1:
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            if pid_j == 0:
                tl.store(dbias_ptr + k, d_bias.to(dbias_ptr.dtype.element_ty), mask=mask_k)
    else:
        tile = (k.to(tl.int64) * RSC)[:, None] + offs_j[None, :]
        tl.store(part_ptr + split.to(tl.int64) * K * RSC + tile, acc, mask=mask)
        if BIAS_GRAD:
            if pid_j == 0:
                tl.store(bpart_ptr + split * K + k, d_bias, mask=mask_k)
        _sum_splits_if_last(part_ptr, bpart_ptr, dw_ptr, dbias_ptr, sem_ptr, tile, dw_offs, mask, k, mask_k, split,
                            n_split, SPLIT_CHUNK, K, RSC, pid_nk + grp * tl.num_programs(0),
                            tl.num_programs(0) * tl.num_programs(1), BIAS_GRAD and (pid_j == 0), BLOCK_N, BLOCK_K)


@triton.jit
def _sum_splits_if_last(part_ptr, bpart_ptr, dw_ptr, dbias_ptr, sem_ptr, tile, dw_offs, mask, k, mask_k, split,
                        n_split, SPLIT_CHUNK, K, RSC, tile_id, n_tiles, BIAS, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """dw (and, with BIAS, d_bias) of this (k, j) tile from its split partials, in two levels: splits in chunks of
    SPLIT_CHUNK; the last split of a chunk to arrive (counter sem[n_tiles + tile_id * chunks + chunk]) sums the chunk's
    partials in split order and, with more than one chunk, stores them as the chunk's level-2 partial (after the
    splits') and arrives at the tile's counter (sem[tile_id]), whose last program sums the chunks' in chunk order and
    writes dw; counters reset by their last programs (the same bits whichever program is last). One chunk: the
    single-level sum."""
    n_chunks = tl.cdiv(n_split, SPLIT_CHUNK)
    chunk = split // SPLIT_CHUNK
    first = chunk * SPLIT_CHUNK
    csem = sem_ptr + n_tiles + tile_id * n_chunks + chunk
    chunk_last = last_arrival(csem, tl.minimum(n_split - first, SPLIT_CHUNK))
    final = chunk_last & (n_chunks == 1)
    total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    total_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if chunk_last:
        tl.store(csem, 0)
        for i in range(first, tl.minimum(first + SPLIT_CHUNK, n_split)):
            total += tl.load(part_ptr + tl.cast(i, tl.int64) * K * RSC + tile, mask=mask, other=0.0,
                             cache_modifier=".cg")
        if BIAS:
            for i in range(first, tl.minimum(first + SPLIT_CHUNK, n_split)):
                total_b += tl.load(bpart_ptr + i * K + k, mask=mask_k, other=0.0, cache_modifier=".cg")
        if n_chunks > 1:
            tl.store(part_ptr + tl.cast(n_split + chunk, tl.int64) * K * RSC + tile, total, mask=mask)
            if BIAS:
                tl.store(bpart_ptr + (n_split + chunk) * K + k, total_b, mask=mask_k)
            final = last_arrival(sem_ptr + tile_id, n_chunks)
            if final:
                tl.store(sem_ptr + tile_id, 0)
                total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                for c in range(0, n_chunks):
                    total += tl.load(part_ptr + tl.cast(n_split + c, tl.int64) * K * RSC + tile, mask=mask,
                                     other=0.0, cache_modifier=".cg")
                if BIAS:
                    total_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
                    for c in range(0, n_chunks):
                        total_b += tl.load(bpart_ptr + (n_split + c) * K + k, mask=mask_k, other=0.0,
                                           cache_modifier=".cg")
    if final:
        tl.store(dw_ptr + dw_offs, total.to(dw_ptr.dtype.element_ty), mask=mask)
        if BIAS:
            tl.store(dbias_ptr + k, total_b.to(dbias_ptr.dtype.element_ty), mask=mask_k)


# Two configs for the dgrad GEMM (as the forward); the elementwise epilogue backward runs one.
_conv_dgrad_kernel_tuned = triton.autotune(configs=GPU_CONFIGS, key=["M_KEY", "C_g", "RSK", "PRECISION"])(
    _conv_dgrad_kernel)
EPILOGUE_CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4)]
_conv_bwd_epilogue_kernel_tuned = triton.autotune(configs=EPILOGUE_CONFIGS, key=["M_KEY", "K"])(
    _conv_bwd_epilogue_kernel)


def _tile_m(tiles: Optional[dict]) -> Optional[int]:
    if tiles is not None and tiles.get("BLOCK_M") is not None:
        return tiles["BLOCK_M"]
    return _INTERPRET_BLOCK_M if INTERPRET else None


def _epilogue_backward(grad_y, y, acc, out_scale, grad_stats, stats, residual, out_relu, geo: ConvGeometry,
                       need_dres: bool, need_sums: bool, sems: Tensor, n_sem: int, act_dtype,
                       tiles: Optional[dict]):
    """Returns (g_acc channels_last in act_dtype, d_residual or None, (slots + chunks, 3, K) fp32 partials
    [sum g, sum g*acc, sum g_acc] with room for reduce_slots' level-2 slots, or None, and the slots). Zeroes the
    first `n_sem` counters of `sems`."""
    M = geo.N * geo.P * geo.Q
    g_acc = empty_channels_last((geo.N, geo.K, geo.P, geo.Q), act_dtype, grad_y.device)
    d_res = empty_channels_last(residual.shape, residual.dtype, grad_y.device) if need_dres else None
    tile_m = _tile_m(tiles)
    tiles_m = {"BLOCK_M": tile_m} if tile_m else None
    part_m = part_rows(EPILOGUE_CONFIGS, tiles_m, _INTERPRET_BLOCK_M)
    unused = dummy(grad_y.device)
    slots = cdiv(M, part_m)   # then room for reduce_slots' level-2 slots
    part = (torch.empty((slots + slot_chunks(slots), 3, geo.K), dtype=torch.float32, device=grad_y.device)
            if need_sums else None)
    block_n = (tiles or {}).get("BLOCK_N") or (pow2_tile(geo.K, 16, 256) if INTERPRET else 64)
    grid = lambda m: (cdiv(M, m["BLOCK_M"]), cdiv(geo.K, m["BLOCK_N"]))  # noqa: E731
    args = (grad_y, y if out_relu else grad_y, unused if acc is None else acc,
            unused if out_scale is None else out_scale.contiguous(),
            unused if grad_stats is None else grad_stats.to(torch.float32).contiguous(),
            unused if grad_stats is None else stats.to(torch.float32).contiguous(),
            g_acc, grad_y if d_res is None else d_res, unused if part is None else part, sems,
            geo.K, geo.P, geo.Q, M, n_sem, 1.0 / max(M, 1), next_pow2(max(M, 1)), *strides4(grad_y),
            *strides4(y if out_relu else None), *strides4(acc), *strides4(g_acc), *strides4(d_res))
    meta = dict(OUT_RELU=bool(out_relu), HAS_OUT_SCALE=out_scale is not None, HAS_ACC=acc is not None,
                HAS_GS=grad_stats is not None, STORE_DRES=need_dres, SUMS=need_sums, PART_M=part_m,
                BLOCK_N=block_n)
    if M > 0:
        launch(_conv_bwd_epilogue_kernel, _conv_bwd_epilogue_kernel_tuned, grid, args, meta, tiles_m)
    return g_acc, d_res, part, slots


def _prologue_vectors(in_scale, in_shift, in_relu, geo: ConvGeometry, x: Tensor) -> tuple[bool, Tensor, Tensor]:
    """(PROLOGUE flag, scale, shift): identities for an absent vector, the dummy when there is no prologue."""
    if has_prologue(in_scale, in_shift, in_relu):
        return (True, *affine_pair(in_scale, in_shift, geo.C, x))
    return False, dummy(x.device), dummy(x.device)


class GaccOnLoad(NamedTuple):
    """What the wgrad and the dgrad need to form g_acc = grad_y + d_mean/n + 2 d_m2 (y - mean) on load
    (GACC_ON_LOAD) instead of reading an epilogue kernel's g_acc: the saved output y and the BN finalize's inputs,
    d_mean and d_m2 computed in the kernels (bn_finalize_grads); and the wgrad's outputs d_bn_weight, d_bn_bias and,
    when given, d_bias = sum g_acc (BIAS_GRAD). Vectors fp32 contiguous (K,) (cached identities for absent ones),
    stats (2, K) fp32 contiguous."""
    y: Tensor                # (N, K, P, Q), any strides
    grad_scale: Tensor
    grad_shift: Tensor
    stats: Tensor
    bn_weight: Tensor        # (K,) contiguous, any float dtype
    count: int               # n = N*P*Q >= 1
    eps: float
    d_bn_weight: Tensor      # out: (K,) in the BN weight's dtype
    d_bn_bias: Tensor        # out: (K,) fp32
    d_bias: Optional[Tensor] = None   # out: the conv bias's gradient (K,) in the bias's dtype, or None (not needed)
    grad_y_scale: Optional[Tensor] = None  # (K,) fp32 contiguous: grad_y * grad_y_scale[k] in place of grad_y
    #                                        (a tail's scale: its g stored once, unscaled), or None (ones)
    recompute: bool = False  # y may be recomputed from x' (recompute_y_allowed); the kernels do where C_g is small
    #                          enough (_recomputes: RECOMPUTE_Y)
    terms: Optional[Tensor] = None  # (3, K) fp32 contiguous [mean, d_mean/n, 2 d_m2]: written by the wgrad (its
    #                                 programs of j tile 0, split 0), read by the dgrad launched after it

    def inputs(self) -> tuple:
        return self.y, self.grad_scale, self.grad_shift, self.stats, self.bn_weight


class _OnLoadMeta(NamedTuple):
    """What a launch configuration reads of a GaccOnLoad (_on_load_scalars), before the GaccOnLoad is made."""
    y: Tensor
    count: int
    eps: float
    recompute: bool = False


def recompute_y_allowed(geo: ConvGeometry, bias: Optional[Tensor], tiles: Optional[dict]) -> bool:
    """Whether the GEMMs forming g_acc on load may recompute y = W x' (+ nothing) from the x' they read instead of
    reading the saved y: a 1x1 conv without padding (y at a row is W times x' at that row's input position), no conv
    bias (`tiles` may say RECOMPUTE_Y=False), and C_g small enough (_recomputes). A memory-bound 1x1 layer saves the
    read of y (K_g / C_g times the size of x) for some MMA work. The recomputed y is the forward's product in another
    summation order, rounded to the stored dtype: it may differ from the saved y in the last place."""
    if tiles is not None and tiles.get("RECOMPUTE_Y") is False:
        return False
    return geo.R == 1 and geo.S == 1 and tuple(geo.padding) == (0, 0) and bias is None


RECOMPUTE_MAX_CHANNELS = 128  # C_g beyond which recomputing y costs more MMA time than reading it saves


def _recomputes(on_load, geo: ConvGeometry) -> bool:
    """Whether a GEMM forming g_acc on load recomputes y (RECOMPUTE_Y). Each of the C_g / tile column (dgrad) or j
    (wgrad) tiles recomputes all of y's K_g x C_g product, so its MMA work is (1 + C_g / tile) times its own: with
    C_g <= 128 and 64-wide tiles at most 3x, still below the time saved not reading y on an H100 (fp16: C_g^2 / 64
    * bandwidth / (peak * 2 bytes) = 0.48 at C_g = 128; 1.9 at 256)."""
    return on_load is not None and on_load.recompute and geo.C_g <= RECOMPUTE_MAX_CHANNELS


def _on_load_ptrs(on_load: Optional[GaccOnLoad], device: torch.device) -> tuple:
    """The seven pointers of GACC_ON_LOAD for a kernel (y, grad_scale, grad_shift, stats, bn_weight, grad_y_scale:
    cached ones without one, the per-channel terms the wgrad writes and the dgrad reads); dummies without on_load."""
    if on_load is None:
        return (dummy(device),) * 7
    if on_load.terms is None:
        raise ValueError("triton conv backward: GaccOnLoad.terms, the (3, K) per-channel terms buffer, is required")
    gys = on_load.grad_y_scale
    return (*on_load.inputs(), identity_vector(1.0, on_load.stats.shape[1], device) if gys is None else gys,
            on_load.terms)


class TailBwd(NamedTuple):
    """A conv whose input x is a block tail's output, x = act_t(y_t * scale_t + shift_t + residual * rs + rb)
    (bn_apply): its dgrad's epilogue runs the tail's backward (TAIL). The gradient of x is the dgrad plus `side`
    (x's gradient from its other consumers); g = where(x <= 0, 0, that) (relu) is stored in place of dx, and the
    sums g*y_t, g (and g*residual) give the tail's d_scale, d_shift (and d_residual_scale)."""
    y: Tensor                   # y_t (N, C, H, W), any strides
    side: Optional[Tensor]      # (N, C, H, W), any strides, or None (zero)
    residual: Optional[Tensor]  # given when d_residual_scale is wanted (sum g*residual), else None
    relu: bool
    bits: Optional[Tensor] = None  # x's ReLU mask as bn_apply_relu_bits stores it ((N*H*W, cdiv(C, 32)) int32), read
    #                                instead of x where given


def _tail_key(tail: Optional[TailBwd]) -> Optional[tuple]:
    if tail is None:
        return None
    return (tensor_key(tail.y), tensor_key(tail.side), tensor_key(tail.residual), bool(tail.relu),
            tail.bits is not None)


def _on_load_scalars(on_load) -> tuple[tuple, tuple]:
    """((count, 1/n, eps), y's strides) for a kernel; zeros without on_load. `on_load`: a GaccOnLoad, or any object
    with its y (a tensor or a (shape, strides) stand-in: OnLoadMeta), count and eps."""
    if on_load is None:
        return (1.0, 1.0, 0.0), (0, 0, 0, 0)
    return (float(on_load.count), 1.0 / on_load.count, float(on_load.eps)), tuple(on_load.y.stride())


def _dgrad_meta(geo: ConvGeometry, tiles: Optional[dict], epilogue_sums: bool = False) -> dict:
    """The dgrad's BLOCK_N (column tile over C_g) and BLOCK_K (reduction tile over R*S*K_g); `epilogue_sums` (the
    prologue's or a tail's sums in its epilogue): 64 columns on a GPU, 128 spilled beside them."""
    rsk = geo.R * geo.S * geo.K_g
    if INTERPRET:
        meta = dict(BLOCK_N=pow2_tile(geo.C_g, 16, 128), BLOCK_K=pow2_tile(rsk, 16, 256))
    else:
        block_k = gpu_tap_tile_k(geo.dtype, geo.R * geo.S, geo.K_g)
        meta = dict(BLOCK_N=64 if epilogue_sums else gpu_tile_n(geo.C_g, tap_steps(geo.K_g, block_k), geo.dtype),
                    BLOCK_K=block_k)
    meta.update({k: v for k, v in (tiles or {}).items() if k in ("BLOCK_N", "BLOCK_K")})
    return meta


@dataclass(frozen=True)
class _GemmLaunch:
    """A wgrad or dgrad launch from its arguments' metadata: the grid, every argument after the pointers (in the
    kernel's order) and the constexprs; with the shapes of the buffers a run allocates."""
    grid: object  # a grid tuple, or a function of the config (autotuned launches)
    scalars: tuple
    meta: dict
    tiles_m: Optional[dict] = None
    part_shape: Optional[tuple] = None  # partial sums (None: none allocated)
    extra_shape: Optional[tuple] = None  # the wgrad's bias partials
    tail: tuple = ()  # the wgrad's arguments after dw's strides


def _dgrad_launch(g_acc, weight, x, in_scale, in_shift, in_relu, geo: ConvGeometry, need_dx: bool, need_stats: bool,
                  meta: dict, tiles: Optional[dict], on_load: Optional[GaccOnLoad] = None,
                  g_strides: Optional[tuple] = None, tail: Optional[TailBwd] = None) -> _GemmLaunch:
    """_dgrad's launch configuration (metadata only); `g_strides`: g_acc's strides when g_acc is not yet made;
    `tail`: the TAIL epilogue (needs no prologue and need_dx: g is stored at dx)."""
    M = geo.N * geo.H * geo.W
    tiles_m, part_m, slots_ph = _dgrad_slots(geo, tiles)
    prologue = has_prologue(in_scale, in_shift, in_relu)
    if tail is not None and (prologue or not need_dx):
        raise ValueError("triton dgrad: a tail epilogue needs an input without a prologue, and its g stored")
    need_stats = need_stats and prologue
    rsk = geo.R * geo.S * geo.K_g
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    phases = sh * sw  # rows by stride phase (h % sh, w % sw): each phase's programs run its live taps only
    m_ph = geo.N * cdiv(geo.H, sh) * cdiv(geo.W, sw)
    load_scalars, y_strides = _on_load_scalars(on_load)
    dx_strides = channels_last_strides(x.shape) if need_dx else (0, 0, 0, 0)
    gh, gw = math.gcd(dh, sh), math.gcd(dw, sw)
    side = None if tail is None else tail.side
    res = None if tail is None else tail.residual
    scalars = (geo.C, geo.H, geo.W, geo.P, geo.Q, geo.N, geo.C_g, geo.K_g, geo.S, rsk, next_pow2(max(M, 1)), m_ph,
               sh // gh, sw // gw, dh // gh, dw // gw,
               *load_scalars, geo.K, *(g_strides or strides4(g_acc)), *y_strides, *krsc_strides(weight),
               *strides4(x), *dx_strides, *strides4(side), *strides4(None if tail is None else tail.y),
               *strides4(res), cdiv(geo.C, 32), *geo.stride, *geo.padding, *geo.dilation)
    # recompute y where the dgrad reads x anyway (the prologue's mask or sums; a tail's mask without its bits) or x
    # is no larger than y: else reading x to save reading y moves more bytes (a block head's 1x1 conv: C = 4 K)
    x_read = (prologue and (bool(in_relu) or need_stats)) or (tail is not None and tail.relu and tail.bits is None)
    recompute = _recomputes(on_load, geo) and (x_read or geo.C * geo.H * geo.W <= geo.K * geo.P * geo.Q)
    if recompute and not INTERPRET and "BLOCK_N" not in (tiles or {}):
        # 128 columns spilled beside the recomputed y tile (epilogue sums: 64 already, _dgrad_meta); a narrow
        # group's 32 channels in one 32-wide tile, not a half-masked 64-wide one (the recompute's x' tile, BLOCK_C
        # wide, halves too): the 32-channel expansion's dgrad 232 -> 217 us modelled (fp16 sm_90)
        meta = dict(meta, BLOCK_N=min(meta["BLOCK_N"], 64 if geo.C_g > 32 else 32))
    block_c = meta["BLOCK_N"]
    if recompute and not INTERPRET:
        # fp16 / bf16: the rows' x' tile of all C_g channels (<= 128) formed once, before the loop (X_ONCE: the
        # prologue's per-element work at every step, the model's 1x1 expansions' dgrads 282 -> 106, 196 -> 97 us
        # modelled, fp16 sm_90); fp32 x' tiles of 64 channels spilled beside the accumulator: 32 a step (once where
        # C_g <= 32)
        block_c = 32 if x.dtype == torch.float32 else pow2_tile(geo.C_g, 16, RECOMPUTE_MAX_CHANNELS)
        if "BLOCK_K" not in (tiles or {}) and not (x.dtype != torch.float32 and geo.C_g <= 64
                                                   and tap_steps(geo.K_g, meta["BLOCK_K"])):
            # the recomputed y tile (BLOCK_M x BLOCK_K, fp32) beside the accumulator spilled with a full-depth step
            # in fp32, and beside a 128-channel x' tile (16-32 B with a prologue, Triton 3.9); fp16 / bf16 keep the
            # 64-deep step where C_g <= 64 and the step lies in K_g (tap steps): the per-step work (the terms'
            # gathers, the loop's overhead) halves (the model's 32- and 64-channel expansions' dgrads 179 -> 141,
            # 97 -> 78 us), and a 64-deep step spanning K_g = 32 twice would lose the tap steps
            meta = dict(meta, BLOCK_K=max(16, meta["BLOCK_K"] // 2))
    if (not INTERPRET and on_load is None and "BLOCK_K" not in (tiles or {})
            and meta["BLOCK_K"] == 64 and tap_steps(geo.K_g, 128)):
        # 128-deep tap steps where the dgrad reads a stored g_acc (nothing formed on load) over K_g a multiple of 128
        # (the forward's deep_steps): a step's fixed work serves twice the MMA work (fp16 sm_90, 128-channel 3x3
        # layers with the prologue's sums: 160 -> 238 SASS a step, 52.8 -> 40.5 us modelled, bench/kernel_audit.py)
        meta = dict(meta, BLOCK_K=128)
    # two groups a program where the column tile is two groups' channels, on a stored g_acc (nothing formed on load)
    pack = 1 if on_load is not None else dgrad_pack(geo, meta)
    cols = geo.groups // pack * cdiv(geo.C_g * pack, meta["BLOCK_N"])
    grid = lambda m: (phases * cdiv(m_ph, m["BLOCK_M"]), cols)  # noqa: E731
    meta = dict(meta, PROLOGUE=prologue, IN_RELU=bool(in_relu), STORE_DX=need_dx, STATS=need_stats,
                GACC_ON_LOAD=on_load is not None, RECOMPUTE_Y=recompute,
                TAIL=tail is not None,
                TAIL_RELU=tail is not None and bool(tail.relu), TAIL_SIDE=side is not None,
                TAIL_RES_SUM=res is not None, TAIL_BITS=tail is not None and tail.relu and tail.bits is not None,
                UPCAST=upcast_bf16(x.dtype), PRECISION=dot_precision(x.dtype),
                TAP_STEPS=tap_steps(geo.K_g, meta["BLOCK_K"]), EVEN_N=(geo.C_g * pack) % meta["BLOCK_N"] == 0,
                PACK=pack, PART_M=part_m,
                BLOCK_S=REDUCE_SLOTS,
                BLOCK_C=block_c if recompute else 16, X_ONCE=recompute and block_c >= geo.C_g,
                CHUNK=CHUNK_SLOTS)
    n_sums = (3 if res is not None else 2) if tail is not None else 2
    part = ((phases * slots_ph + slot_chunks(slots_ph, phases), n_sums, geo.C) if need_stats or tail is not None
            else None)
    return _GemmLaunch(grid, scalars, meta, tiles_m, part)


def _dgrad(g_acc, weight, x, in_scale, in_shift, in_relu, geo: ConvGeometry, need_dx: bool, need_stats: bool,
           meta: dict, sems: Tensor, tiles: Optional[dict], on_load: Optional[GaccOnLoad] = None,
           launch_config: Optional[_GemmLaunch] = None, tail: Optional[TailBwd] = None):
    """Returns (dx channels_last in x.dtype or None, (d_in_scale, d_in_shift) or None). With the prologue sums, the
    first _dgrad_counters counters of `sems` must be 0 (zeroed by the epilogue kernel, or persistent
    stream_counters). With `on_load`, `g_acc` is grad_y and g_acc is formed on load (GaccOnLoad). `launch_config`:
    _dgrad_launch's for these arguments (a memoised plan), else made here. With `tail` (TailBwd): (the tail's g in
    place of dx, (d_scale_t, d_shift_t, d_residual_scale_t or None)), fp32 sums, the counters as the prologue's."""
    cfg = launch_config or _dgrad_launch(g_acc, weight, x, in_scale, in_shift, in_relu, geo, need_dx, need_stats,
                                         meta, tiles, on_load, tail=tail)
    M = geo.N * geo.H * geo.W
    dx = empty_channels_last(x.shape, x.dtype, x.device) if need_dx else None
    prologue, scale, shift = _prologue_vectors(in_scale, in_shift, in_relu, geo, x)
    unused = dummy(x.device)
    sums = None
    part = unused
    if cfg.part_shape is not None:
        part = torch.empty(*cfg.part_shape, dtype=torch.float32, device=x.device)
        if tail is not None:
            make = torch.zeros if M == 0 else torch.empty  # (no program runs: the sums of nothing)
            sums = tuple(make(geo.C, dtype=torch.float32, device=x.device) for _ in range(cfg.part_shape[1]))
            if M == 0:
                return dx.zero_(), (*sums[:2], sums[2] if len(sums) > 2 else None)
        else:
            vec_dtype = lambda v: torch.float32 if v is None else v.dtype  # noqa: E731
            if M == 0:  # no program runs: the sums of nothing
                return dx, tuple(torch.zeros(geo.C, dtype=vec_dtype(v), device=x.device) for v in (in_scale, in_shift))
            sums = tuple(torch.empty(geo.C, dtype=vec_dtype(v), device=x.device) for v in (in_scale, in_shift))
    weight, _ = krsc(weight)
    t_ptrs = (unused,) * 5
    if tail is not None:
        t_ptrs = (unused if tail.side is None else tail.side, tail.y,
                  unused if tail.residual is None else tail.residual, sums[2] if len(sums) > 2 else unused,
                  unused if tail.bits is None else tail.bits)
    args = (g_acc, weight, x, scale, shift, *_on_load_ptrs(on_load, x.device), x if dx is None else dx, part,
            unused if sums is None else sums[0], unused if sums is None else sums[1], sems, *t_ptrs, *cfg.scalars)
    if M > 0:
        launch(_conv_dgrad_kernel, _conv_dgrad_kernel_tuned, cfg.grid, args, cfg.meta, cfg.tiles_m)
    if tail is not None:
        return dx, (*sums[:2], sums[2] if len(sums) > 2 else None)
    return dx, sums


@dataclass(frozen=True)
class _WgradPlan:
    """The wgrad launch: tiles of m (rows reduced), k (rows of dw), j = (r, s, c) (columns), and the split of M."""
    block_m: int
    block_n: int
    block_k: int
    split: int
    m_per_split: int
    grid: tuple[int, int, int]

    split_chunk: int = 1
    num_warps: int = 4   # 8 with twice the dtype's j tile
    trans_acc: bool = False   # dw^T = x'^T g_acc (TRANS_ACC): the k tile is the MMA's N

    @property
    def counters(self) -> int:
        """Counters the split reduction needs (per (k, j) tile and group: the tile's and one per chunk of splits), 0
        without a split."""
        return self.grid[0] * self.grid[1] * (1 + self.chunks) if self.split > 1 else 0

    @property
    def chunks(self) -> int:
        """Chunks of split_chunk splits (the level-2 partials)."""
        return cdiv(self.split, self.split_chunk)


def split_chunk(split: int) -> int:
    """Splits per chunk of the wgrad's two-level sum of its split partials: all of them up to 8 (one level), else
    ceil(sqrt(split)), which keeps the last program's serial steps (a chunk, an arrival, the chunks) near
    2 sqrt(split) instead of split (256 splits of a 1x1 layer: 33 steps, not 256)."""
    return split if split <= 8 else math.isqrt(split - 1) + 1


def _wgrad_plan(geo: ConvGeometry, tiles: Optional[dict], prologue: bool = True) -> _WgradPlan:
    """The wgrad's tiles and split for `geo`; `tiles` overrides BLOCK_M / N / K, SPLIT, SPLIT_CHUNK, TRANS_ACC.
    `prologue`: whether the wgrad forms x' (False: it reads x as is, or the x' the forward stored)."""
    M = geo.N * geo.P * geo.Q
    rsc = geo.R * geo.S * geo.C_g
    num_warps, trans_acc = 4, False
    if INTERPRET:
        block_m, block_n, block_k, split = 128, pow2_tile(geo.K_g, 16, 128), pow2_tile(rsc, 16, 256), 1
    else:
        # spill-free tiles on sm_90 for fp16 / bf16 / TF32 (bench/kernel_audit.py, Triton 3.6 and 3.9); the stem
        # (R*S*C_g = 27: 3-channel pixels gathered element by element) reduces 32 rows a step: 64 spilled. Twice
        # the dtype's j tile (on 8 warps) wherever R*S*C_g holds two: the g_acc tile formed on load then feeds
        # twice the MMA work, which pays for a masked last j tile too (a 64-channel 3x3 layer's 576 columns in 5
        # tiles of 128, not 9 of 64: -5 to -10 % of its modelled training time, bench/kernel_audit.py)
        block_m, block_n, block_k = (64 if rsc >= 32 else 32), 64, gpu_tile_k(geo.dtype, rsc)
        # R*S*C_g <= 32 (a narrow group's 1x1 layer): one j tile of that width, not a half-masked 64-wide one
        # (the x' tile's and the recompute's per-element work halves), and with K_g >= 128 a 128-row k tile on the
        # same 4 warps (the x' tile then feeds twice the MMA work): the 32-channel 1x1 expansion's wgrad (K_g = 128,
        # y recomputed, fp16 sm_90) 292 -> 178 us modelled a launch (bench/kernel_audit.py)
        block_k = min(block_k, pow2_tile(rsc, 16, block_k))
        if geo.K_g >= 128 and (geo.R, geo.S) == (1, 1) and rsc <= 32 and geo.dtype != torch.float32:
            # Elsewhere 128-row k tiles spilled (sm_90): with 128-deep j tiles 150-230 B with a prologue or y
            # recomputed, and even on plain 1x1 stride-1 layers (x read as is, y read) 184 B with Triton 3.6 (none
            # with 3.9, 16 in bf16); the stem's 3-channel taps 68 (bench/kernel_audit.py)
            block_n = 128
        if rsc >= 2 * block_k and block_m == 64 and wide_tiles(geo.dtype):
            # ... and on 8 warps dw^T = x'^T g_acc (TRANS_ACC): both operands from shared memory, the g_acc formed
            # on load stored there as is (not read back transposed into the MMA's register layout: 335 -> 311 SASS
            # a step, 208 -> 192 registers, a 128-channel 3x3 layer, fp16 sm_90; -1 % of the models' modelled
            # training time, bench/kernel_audit.py)
            block_k, num_warps, trans_acc = 2 * block_k, 8, True
            # Narrow groups (K_g <= 32: the layer1 convs of the PE models): a k tile of K_g rows as the MMA's N
            # (wgmma takes N = 16, 32; its M is the 128-deep j tile) instead of a 64-row tile half or three quarters
            # masked, whose g_acc formed on load was the loop's largest part: a 32-channel 3x3 layer's loop (64 x
            # 128 x 32, fp16 sm_90) 411 -> 291 SASS a step (bench/kernel_audit.py)
            if geo.K_g <= 32:
                block_n, trans_acc = pow2_tile(geo.K_g, 16, 32), True
                if not prologue and geo.dtype != torch.float32:
                    # x read as is (no prologue: the stored x'), 2-byte operands: 128-row steps, the step's fixed
                    # work (the rows' offsets and bounds, the pipeline's bookkeeping) for twice the rows (a
                    # 32-channel 3x3 layer's wgrad on the stored x' 216 -> 167 us modelled, fp16 sm_90; beside a
                    # prologue 32 B spilled in bf16, and 64-row k tiles spilled 100-168 B on sm_80)
                    block_m = 128
        # Enough warps to fill the GPU (4096: 1024 programs of 4 warps, 512 of 8), each program still reducing a
        # long stretch of M; counted in warps so the 8-warp tiles do not double the splits and their partials.
        tiles_per_split = max(8, cdiv(cdiv(M, block_m) * geo.groups * cdiv(geo.K_g, block_n)
                                      * cdiv(rsc, block_k), 4096 // num_warps))
        split = max(1, cdiv(cdiv(M, block_m), tiles_per_split))
    tiles = tiles or {}
    block_m = tiles.get("BLOCK_M") or block_m
    block_n = tiles.get("BLOCK_N") or block_n
    block_k = tiles.get("BLOCK_K") or block_k
    split = max(1, min(tiles.get("SPLIT") or split, cdiv(M, block_m)))
    m_per_split = max(1, cdiv(cdiv(M, block_m), split)) * block_m
    split = max(1, cdiv(M, m_per_split))
    grid = (cdiv(geo.K_g, block_n) * cdiv(rsc, block_k), geo.groups, split)
    chunk = max(1, min(tiles.get("SPLIT_CHUNK") or split_chunk(split), split))
    trans_acc = bool(tiles.get("TRANS_ACC", trans_acc))
    return _WgradPlan(block_m, block_n, block_k, split, m_per_split, grid, chunk, num_warps, trans_acc)


def aligned_rows(P: int, Q: int, block: int) -> bool:
    """Whether every `block` consecutive rows m = (n P + p) Q + q starting at a multiple of `block` lie in one image
    n at (p0 + i // Q, q0 + i % Q), i < block, from the first (p0, q0): P*Q a multiple of the block, and Q a divisor
    or a multiple of it (ALIGNED_ROWS: the wgrad splits each step's first row only, as scalars)."""
    return P * Q > 0 and (P * Q) % block == 0 and (block % Q == 0 or Q % block == 0)


def whole_images(P: int, Q: int, block: int) -> bool:
    """Whether every `block` consecutive rows m = (n P + p) Q + q starting at a multiple of `block` are whole images
    (WHOLE_IMAGES: the block a multiple of P*Q; row i of a step at (n0 + i // (P Q), i % (P Q) // Q, i % Q): every
    row's position and bounds the same at every step, the step's first image n0 a scalar)."""
    return P * Q > 0 and block % (P * Q) == 0


def _wgrad_launch(g_acc, x, weight, in_scale, in_shift, in_relu, geo: ConvGeometry, plan: _WgradPlan,
                  on_load: Optional[GaccOnLoad] = None, bias_grad: bool = False,
                  g_strides: Optional[tuple] = None, store_gacc: bool = False) -> _GemmLaunch:
    """_wgrad's launch configuration (metadata only); `g_strides`: g_acc's strides when g_acc is not yet made."""
    M = geo.N * geo.P * geo.Q
    rsc = geo.R * geo.S * geo.C_g
    load_scalars, y_strides = _on_load_scalars(on_load)
    g_strides = g_strides or strides4(g_acc)
    scalars = (geo.H, geo.W, geo.K, geo.P, geo.Q, M, geo.C_g, geo.K_g, geo.S, rsc, plan.m_per_split,
               plan.split_chunk, *divisor_magic(geo.P * geo.Q), *divisor_magic(geo.Q), *load_scalars,
               *g_strides, *y_strides, *strides4(x))  # then dw's strides (the run's dw)
    flat_g = dense_rows(g_strides, geo.N, geo.P, geo.Q) and (on_load is None
                                                              or dense_rows(y_strides, geo.N, geo.P, geo.Q))
    flat_x = ((geo.R, geo.S) == (1, 1) and tuple(geo.stride) == (1, 1) and tuple(geo.padding) == (0, 0)
              and dense_rows(strides4(x), geo.N, geo.H, geo.W))
    recompute = _recomputes(on_load, geo)
    tail = (*(weight.stride()[:2] if recompute else (0, 0)), *geo.stride, *geo.padding, *geo.dilation)
    # the recomputed y tile (BLOCK_N x BLOCK_M, fp32) spilled with 64-row steps (fp32 / TF32, and fp16 / bf16 with a
    # prologue on Triton 3.6): 32 (M_PER_SPLIT stays a multiple of it)
    block_m = 32 if recompute and not INTERPRET else plan.block_m
    split_rows = not (flat_g and flat_x)
    whole = split_rows and whole_images(geo.P, geo.Q, block_m)
    aligned = split_rows and not whole and aligned_rows(geo.P, geo.Q, block_m)
    tap_rows = (aligned or whole) and not flat_x and tap_steps(geo.C_g, plan.block_k)
    meta = dict(PROLOGUE=has_prologue(in_scale, in_shift, in_relu), IN_RELU=bool(in_relu),
                GACC_ON_LOAD=on_load is not None, RECOMPUTE_Y=recompute,
                Y_FROM_B=recompute and plan.block_k >= geo.C_g, BIAS_GRAD=bias_grad, STORE_GACC=store_gacc,
                FLAT_G=flat_g, FLAT_X=flat_x, ALIGNED_ROWS=aligned, WHOLE_IMAGES=whole, TAP_ROWS=tap_rows,
                TRANS_ACC=plan.trans_acc, UPCAST=upcast_bf16(x.dtype),
                PRECISION=dot_precision(x.dtype), EVEN_M=M % block_m == 0, EVEN_N=geo.K_g % plan.block_n == 0,
                EVEN_K=rsc % plan.block_k == 0, BLOCK_M=block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                num_warps=plan.num_warps)
    rows = plan.split + plan.chunks   # the splits' partials, then the chunks' (two levels)
    return _GemmLaunch(plan.grid, scalars, meta, None, (rows, geo.K, rsc) if plan.split > 1 else None,
                       (rows, geo.K) if bias_grad and plan.split > 1 else None, tail)


def _wgrad(g_acc, x, weight, in_scale, in_shift, in_relu, geo: ConvGeometry, plan: _WgradPlan, sems: Tensor,
           on_load: Optional[GaccOnLoad] = None, launch_config: Optional[_GemmLaunch] = None,
           gacc_out: Optional[Tensor] = None):
    """Weight gradient (K, C_g, R, S) in weight.dtype and in the weight's strides (torch.empty_like: a channels_last
    weight gets a channels_last dw, which autograd's AccumulateGrad takes without a copy), written by the kernel; a
    split-M launch sums its fp32 partials in two levels (chunks of plan.split_chunk splits, then the chunks:
    deterministic, fixed orders), on
    `plan.counters` counters of `sems` that must be 0 (zeroed by the epilogue kernel, or persistent
    stream_counters). With `on_load`, `g_acc` is grad_y, g_acc is formed on load and the kernel also writes
    on_load.d_bn_weight, d_bn_bias and on_load.d_bias if given (needs M > 0). Not autotuned: one config, and every
    (split, k, j) element of the partial buffers is written by the grid. `launch_config`: _wgrad_launch's for these
    arguments (a memoised plan), else made here."""
    if geo.N * geo.P * geo.Q == 0:
        return torch.zeros_like(weight)
    bias_grad = on_load is not None and on_load.d_bias is not None
    cfg = launch_config or _wgrad_launch(g_acc, x, weight, in_scale, in_shift, in_relu, geo, plan, on_load,
                                         bias_grad)
    unused = dummy(x.device)
    dw = torch.empty_like(weight)
    part = unused if cfg.part_shape is None else torch.empty(*cfg.part_shape, dtype=torch.float32, device=x.device)
    bpart = unused if cfg.extra_shape is None else torch.empty(*cfg.extra_shape, dtype=torch.float32, device=x.device)
    _, scale, shift = _prologue_vectors(in_scale, in_shift, in_relu, geo, x)
    outs = (on_load.d_bn_weight, on_load.d_bn_bias) if on_load is not None else (unused, unused)
    if cfg.meta["STORE_GACC"] != (gacc_out is not None):
        raise ValueError("triton wgrad: gacc_out must be given exactly when the launch stores g_acc (STORE_GACC)")
    _conv_wgrad_kernel[cfg.grid](g_acc, x, weight, scale, shift, *_on_load_ptrs(on_load, x.device),
                                 unused if gacc_out is None else gacc_out, dw, part, sems,
                                 *outs, on_load.d_bias if bias_grad else unused, bpart, *cfg.scalars, *dw.stride(),
                                 *cfg.tail, **cfg.meta)
    return dw


def _dgrad_slots(geo: ConvGeometry, tiles: Optional[dict]) -> tuple[Optional[dict], int, int]:
    """(explicit BLOCK_M tile or None, PART_M, slots per stride phase) of the dgrad's partial sums: each of the
    sh * sw phases owns cdiv(M_PH, PART_M) slots, M_PH = N * cdiv(H, sh) * cdiv(W, sw) (the largest phase's rows)."""
    tile_m = _tile_m(tiles)
    tiles_m = {"BLOCK_M": tile_m} if tile_m else None
    part_m = part_rows(GPU_CONFIGS, tiles_m, _INTERPRET_BLOCK_M)
    (sh, sw) = geo.stride
    return tiles_m, part_m, cdiv(geo.N * cdiv(geo.H, sh) * cdiv(geo.W, sw), part_m)


def dgrad_pack(geo: ConvGeometry, meta: dict) -> int:
    """The dgrad's groups per program (PACK) with these tiles, reading a stored g_acc (pack_groups over C_g columns
    and K_g channels a group)."""
    return pack_groups(geo.groups, geo.C_g, geo.K_g, meta["BLOCK_N"], meta["BLOCK_K"])


def _dgrad_counters(geo: ConvGeometry, meta: dict, tiles: Optional[dict]) -> int:
    """Counters of the dgrad's two-level sums: chunk_counters over its column blocks (PACK groups each, at most:
    counters for the unpacked blocks, one launch plan whatever the dgrad reads) and its stride phases' chunks."""
    slots_ph = _dgrad_slots(geo, tiles)[2]
    return chunk_counters(geo.groups * cdiv(geo.C_g, meta["BLOCK_N"]), slot_chunks(slots_ph, geo.stride[0]
                                                                                   * geo.stride[1]))


def _gemm_plans(geo: ConvGeometry, need_w: bool, need_dgrad: bool, need_in_sums: bool, in_scale, in_shift, in_relu,
                tiles: Optional[dict], tail: bool = False,
                x_prime: bool = False) -> tuple[Optional[_WgradPlan], Optional[dict], int, int]:
    """(wgrad plan or None, dgrad meta or None, first wgrad counter, counters in all). The counters of the in-kernel
    reductions (the dgrad's prologue or tail sums, the wgrad's split) share one int32 buffer, the dgrad's first; the
    wgrad's start 16-byte aligned (one pointer specialisation whatever the sizes)."""
    # (x_prime: the wgrad reads the stored x', no prologue)
    wplan = _wgrad_plan(geo, tiles, has_prologue(in_scale, in_shift, in_relu) and not x_prime) if need_w else None
    dgrad_sums = need_dgrad and (tail or (need_in_sums and has_prologue(in_scale, in_shift, in_relu)))
    dmeta = _dgrad_meta(geo, tiles, dgrad_sums) if need_dgrad else None
    n_dsem = _dgrad_counters(geo, dmeta, tiles) if dgrad_sums else 0
    w_first = cdiv(n_dsem, 4) * 4
    return wplan, dmeta, w_first, w_first + (wplan.counters if wplan is not None else 0)


def conv_bwd(grad_y: Tensor, grad_stats: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
             in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor],
             out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int, y: Tensor,
             needs_grad: Sequence[bool], stats: Optional[Tensor] = None,
             tiles: Optional[dict] = None) -> list[Optional[Tensor]]:
    """Launcher of the fused backward; `stats`: the forward's (2, K) [mean, m2], needed with grad_stats;
    `tiles` overrides tile sizes (keys BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, SPLIT_CHUNK)."""
    geo = conv_geometry(x, weight, stride, padding, dilation, groups)
    out_shape = (geo.N, geo.K, geo.P, geo.Q)
    check_4d("grad_y", grad_y)
    check_shape("grad_y", grad_y, out_shape)
    if out_relu:
        check_4d("y", y)
        check_shape("y", y, out_shape)
    for name, t, n in (("bias", bias, geo.K), ("in_scale", in_scale, geo.C), ("in_shift", in_shift, geo.C),
                       ("out_scale", out_scale, geo.K), ("out_shift", out_shift, geo.K)):
        check_vector(name, t, n)
    if residual is not None:
        check_shape("residual", residual, out_shape)
    if grad_stats is not None and grad_stats.numel() == 0:
        grad_stats = None
    if grad_stats is not None:
        check_shape("grad_stats", grad_stats, (2, geo.K))
        if stats is None or stats.numel() == 0:
            raise ValueError("triton conv_fused_backward: grad_stats is given but the forward's stats are missing "
                             "(pass the (2, K) [mean, m2] that conv_fused returned as `stats`)")
        check_shape("stats", stats, (2, geo.K))
    else:
        stats = None
    check_same_device(x.device, grad_y=grad_y, grad_stats=grad_stats, stats=stats, bias=bias, in_scale=in_scale,
                      in_shift=in_shift, out_scale=out_scale, out_shift=out_shift, residual=residual,
                      y=y if out_relu else None)
    needs_grad = [bool(v) for v in needs_grad]
    if len(needs_grad) != 8:
        raise ValueError(f"needs_grad must have 8 entries (CONV_GRAD_NAMES), got {len(needs_grad)}")
    inputs = (x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual)
    need = [flag and t is not None for flag, t in zip(needs_grad, inputs)]
    need_x, need_w, _, need_isc, need_ish, need_osc, _, need_res = need
    grads: list[Optional[Tensor]] = [None] * 8
    if not any(need):
        return grads

    # acc is needed for d_out_scale and for the grad_stats[1] term. Without an epilogue the forward stored
    # y = acc (in x.dtype, as the torch backend keeps it): read it. Otherwise recompute it (fp32, no epilogue).
    acc = None
    if need_osc or grad_stats is not None:
        if out_scale is None and out_shift is None and residual is None and not out_relu:
            check_4d("y", y)
            check_shape("y", y, out_shape)
            acc = y
        else:
            acc, _ = conv_fwd(x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False, stride,
                              padding, dilation, groups, False, out_dtype=torch.float32, tiles=forward_tiles(tiles))
    need_dgrad = need_x or need_isc or need_ish
    need_sums = need[2] or need_osc or need[6]
    wplan, dmeta, w_first, n_sem = _gemm_plans(geo, need_w, need_dgrad, need_isc or need_ish, in_scale, in_shift,
                                               in_relu, tiles)
    sems = torch.empty(max(n_sem, 4), dtype=torch.int32, device=x.device)  # zeroed by the epilogue kernel
    g_acc, d_res, part, slots = _epilogue_backward(grad_y, y, acc, out_scale, grad_stats, stats, residual, out_relu,
                                                   geo, need_res, need_sums, sems, n_sem, x.dtype, tiles)
    if wplan is not None:
        grads[1] = _wgrad(g_acc, x, weight, in_scale, in_shift, in_relu, geo, wplan, sems[w_first:])
    if need_dgrad:
        dx, in_sums = _dgrad(g_acc, weight, x, in_scale, in_shift, in_relu, geo, need_x, need_isc or need_ish,
                             dmeta, sems, tiles)
        grads[0] = dx
        if need_isc:
            grads[3] = in_sums[0]
        if need_ish:
            grads[4] = in_sums[1]
    if need_sums:  # [sum g, sum g*acc, sum g_acc] -> d_out_shift, d_out_scale, d_bias: one launch
        outputs = [(0, out_shift, need[6]), (1, out_scale, need_osc), (2, bias, need[2])]
        totals = {row: torch.empty(geo.K, dtype=v.dtype, device=x.device) for row, v, flag in outputs if flag}
        reduce_slots(part, slots, list(totals.items()))
        grads[6], grads[5], grads[2] = totals.get(0), totals.get(1), totals.get(2)
    grads[7] = d_res
    return grads


def conv_fused_backward(grad_y: Tensor, grad_stats: Optional[Tensor], x: Tensor, weight: Tensor,
                        bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                        in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
                        residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int, y: Tensor,
                        needs_grad: Sequence[bool], stats: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Triton implementation of pe_kernels.reference.conv_fused_backward (same arguments, same results)."""
    return conv_bwd(grad_y, grad_stats, x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                    residual, out_relu, stride, padding, dilation, groups, y, needs_grad, stats)


# --------------------------------------------------------------------------------------------------------------
# 5. conv -> BatchNorm (training) backward: the BN finalize's backward and g_acc inside the wgrad and the dgrad
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ConvBnBwdPlan:
    """conv_bn_bwd's checks and launch configuration from its arguments' metadata (LaunchPlans)."""
    geo: ConvGeometry
    needs: tuple  # needs_grad, as bools
    need_inputs: tuple  # (x, weight, bias, in_scale, in_shift): needed and given
    composed: bool  # the composition (no weight gradient, or an empty batch), else the two-launch fast path
    gemms: Optional[tuple]  # _gemm_plans' (wgrad plan, dgrad meta, first wgrad counter, counters) on the fast path
    wgrad: Optional[_GemmLaunch] = None  # the fast path's launch configurations
    dgrad: Optional[_GemmLaunch] = None
    cast: bool = True  # whether a vector (grad_scale, grad_shift, stats, bn_weight) needs a cast / copy to the
    #                    contiguous fp32 (bn_weight: contiguous) the kernels read; else they are passed as they are


def _wgrad_input(x, in_scale, in_shift, in_relu, x_prime: Optional[Tensor]) -> tuple:
    """(the wgrad's x, in_scale, in_shift, in_relu): the stored x' as it is (no prologue) where the forward stored
    one, else x and its prologue."""
    return (x, in_scale, in_shift, in_relu) if x_prime is None else (x_prime, None, None, False)


def _zero_grad_y(shape: tuple, device) -> Tensor:
    """An absent grad_y: a zero read through the strides of an expanded one-element tensor (no launch)."""
    return identity_vector(0.0, 1, device).view(1, 1, 1, 1).expand(shape)


_CONV_BN_BWD_PLANS = LaunchPlans("conv_bn_bwd")


def fast_backward(y: Tensor, need_weight: bool) -> bool:
    """Whether conv_bn_bwd takes its two-launch path for a conv of output `y` (else the composition): the weight's
    gradient is needed and N*P*Q > 0. A tail epilogue (TailBwd) exists on that path only."""
    return need_weight and y.shape[0] * y.shape[2] * y.shape[3] > 0


def stores_gacc(dgrad: _GemmLaunch) -> bool:
    """Whether the wgrad stores the g_acc it forms (STORE_GACC) for the dgrad launched after it to read
    (channels_last), given the dgrad's launch as it would form g_acc on load: unless that dgrad recomputes y (reading
    grad_y and not y). The same bytes: g_acc written and read once, for grad_y and y read by the dgrad; and the
    dgrad's loop forms nothing (fp16 sm_90, 128 x 128 x 64 tiles on 8 warps: 520 -> 196 SASS a step)."""
    return not dgrad.meta["RECOMPUTE_Y"]


def _plan_conv_bn_bwd(grad_y, grad_scale, grad_shift, x, weight, bias, in_scale, in_shift, in_relu, stride, padding,
                      dilation, groups, y, stats, bn_weight, eps, needs_grad, tiles, grad_y_scale=None,
                      tail: Optional[TailBwd] = None, x_prime: Optional[Tensor] = None) -> _ConvBnBwdPlan:
    geo = conv_geometry(x, weight, stride, padding, dilation, groups)
    if x_prime is not None:
        check_4d("x_prime", x_prime)
        check_shape("x_prime", x_prime, tuple(x.shape))
        if x_prime.dtype != x.dtype:
            raise TypeError(f"triton conv_bn_bwd: x_prime has dtype {x_prime.dtype}, x {x.dtype}: they must match")
        check_same_device(x.device, x_prime=x_prime)
    out_shape = (geo.N, geo.K, geo.P, geo.Q)
    check_4d("y", y)
    check_shape("y", y, out_shape)
    if grad_y is not None:
        check_4d("grad_y", grad_y)
        check_shape("grad_y", grad_y, out_shape)
    check_shape("stats", stats, (2, geo.K))
    if stats.dtype != torch.float32:
        raise TypeError(f"triton backend: stats must be float32, got {stats.dtype}")
    for name, t, n in (("bias", bias, geo.K), ("in_scale", in_scale, geo.C), ("in_shift", in_shift, geo.C),
                       ("grad_scale", grad_scale, geo.K), ("grad_shift", grad_shift, geo.K),
                       ("bn_weight", bn_weight, geo.K), ("grad_y_scale", grad_y_scale, geo.K)):
        check_vector(name, t, n)
    tail_tensors = {}
    if tail is not None:
        tail_tensors = dict(tail_y=tail.y, tail_side=tail.side, tail_residual=tail.residual)
        for name, t in tail_tensors.items():
            if t is not None:
                check_4d(name, t)
                check_shape(name, t, tuple(x.shape))
        if tail.bits is not None:
            n, c, h, w = x.shape
            check_shape("tail_bits", tail.bits, (n * h * w, cdiv(c, 32)))
            if tail.bits.dtype != torch.int32 or not tail.bits.is_contiguous():
                raise TypeError(f"triton conv_bn_bwd: tail bits must be contiguous int32, got {tail.bits.dtype}")
            tail_tensors["tail_bits"] = tail.bits
    check_same_device(x.device, grad_y=grad_y, grad_scale=grad_scale, grad_shift=grad_shift, bias=bias,
                      in_scale=in_scale, in_shift=in_shift, y=y, stats=stats, bn_weight=bn_weight,
                      grad_y_scale=grad_y_scale, **tail_tensors)
    needs = tuple(bool(v) for v in needs_grad)
    if len(needs) != 7:
        raise ValueError(f"needs_grad must have 7 entries (CONV_BN_GRAD_NAMES), got {len(needs)}")
    inputs = (x, weight, bias, in_scale, in_shift)
    need_inputs = tuple(flag and t is not None for flag, t in zip(needs, inputs))
    need_x, need_w, _, need_isc, need_ish = need_inputs
    if not fast_backward(y, need_w):
        if tail is not None:
            raise ValueError("triton conv_bn_bwd: a tail epilogue needs the two-launch path (fast_backward)")
        return _ConvBnBwdPlan(geo, needs, need_inputs, True, None)
    if tail is not None and (not need_x or has_prologue(in_scale, in_shift, in_relu)):
        raise ValueError("triton conv_bn_bwd: a tail epilogue needs x's gradient and an input without a prologue")
    need_dgrad = need_x or need_isc or need_ish
    gemms = _gemm_plans(geo, True, need_dgrad, need_isc or need_ish, in_scale, in_shift, in_relu, tiles,
                        tail is not None, x_prime is not None)
    wplan, dmeta = gemms[:2]
    on_load = _OnLoadMeta(y, geo.N * geo.P * geo.Q, eps, recompute_y_allowed(geo, bias, tiles))
    # an absent grad_y: the expanded zero of _zero_grad_y (stride 0 where expanded, 1 on size-1 dims)
    g_strides = tuple(1 if n == 1 else 0 for n in out_shape) if grad_y is None else strides4(grad_y)
    dgrad = (_dgrad_launch(None, weight, x, in_scale, in_shift, in_relu, geo, need_x, need_isc or need_ish, dmeta,
                           tiles, on_load, g_strides, tail) if need_dgrad else None)
    store_gacc = dgrad is not None and stores_gacc(dgrad)
    if store_gacc:
        dgrad = _dgrad_launch(None, weight, x, in_scale, in_shift, in_relu, geo, need_x, need_isc or need_ish, dmeta,
                              tiles, None, channels_last_strides(out_shape), tail)
    wx, *w_prologue = _wgrad_input(x, in_scale, in_shift, in_relu, x_prime)
    wgrad = _wgrad_launch(None, wx, weight, *w_prologue, geo, wplan, on_load, need_inputs[2], g_strides, store_gacc)
    cast = not (all(t is None or (t.dtype == torch.float32 and t.is_contiguous())
                    for t in (grad_scale, grad_shift, stats, grad_y_scale))
                and (bn_weight is None or bn_weight.is_contiguous()))
    return _ConvBnBwdPlan(geo, needs, need_inputs, False, gemms, wgrad, dgrad, cast)


def conv_bn_bwd(grad_y: Optional[Tensor], grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], x: Tensor,
                weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                in_relu: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                y: Tensor, stats: Tensor, bn_weight: Optional[Tensor], eps: float, needs_grad: Sequence[bool],
                tiles: Optional[dict] = None, x_prime: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Launcher of conv_bn_train_backward (conv_bn_bwd_ext without its extensions but x_prime; see there)."""
    return conv_bn_bwd_ext(grad_y, grad_scale, grad_shift, x, weight, bias, in_scale, in_shift, in_relu, stride,
                           padding, dilation, groups, y, stats, bn_weight, eps, needs_grad, tiles,
                           x_prime=x_prime)[0]


def conv_bn_bwd_ext(grad_y: Optional[Tensor], grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], x: Tensor,
                    weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                    in_relu: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int, y: Tensor, stats: Tensor, bn_weight: Optional[Tensor], eps: float,
                    needs_grad: Sequence[bool], tiles: Optional[dict] = None, grad_y_scale: Optional[Tensor] = None,
                    tail: Optional[TailBwd] = None,
                    x_prime: Optional[Tensor] = None) -> tuple[list[Optional[Tensor]], Optional[tuple]]:
    """Launcher of conv_bn_train_backward; `tiles` overrides the wgrad / dgrad tiles (keys BLOCK_M, BLOCK_N, BLOCK_K,
    SPLIT, SPLIT_CHUNK; the fallback ignores them).

    Fast path, two launches (one without dgrad): when the weight's gradient is needed and N*P*Q > 0. The wgrad
    reads grad_y and y and forms g_acc = grad_y + d_mean/n + 2 d_m2 (y - mean) on load, d_mean and d_m2 from
    the BN finalize's backward computed per channel in the kernel; its programs of j tile 0 store that g_acc for the
    dgrad launched after it (stores_gacc), or, where the dgrad recomputes y, the dgrad forms g_acc on load too, from
    the per-channel terms the wgrad wrote; the wgrad's programs of j tile 0 and split 0
    write d_bn_weight and d_bn_bias, and, when the conv bias's gradient is needed, those of j tile 0 sum the g_acc
    they load (rounded to x.dtype, as the dot consumes it) into d_bias (BIAS_GRAD; a split's partials summed with
    dw's, in two levels); no epilogue kernel, no finalize-backward kernel, no reduce launch; the
    counters are the persistent stream_counters. Otherwise the composition contract.composed_conv_bn_train_backward
    of this backend's bn_finalize_backward and conv_fused_backward (four launches, five with d_bias).

    Extensions (conv_bn_junction_backward): `grad_y_scale` (K,): the gradient of y is grad_y * grad_y_scale[k]
    (formed on load on the fast path); `tail` (TailBwd, fast path only, x's gradient needed, no prologue): the dgrad's
    epilogue runs the backward of the block tail that made x; grads[0] is then the tail's g, and the second result
    its (d_scale, d_shift, d_residual_scale or None) (None without a tail); `x_prime`: x' = act(x * in_scale +
    in_shift) as the forward stored it (conv_bn_train(x_prime=True), x's shape and dtype): the wgrad reads it
    instead of forming it (the dgrad still reads x for the prologue's backward)."""
    args = (grad_y, grad_scale, grad_shift, x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation,
            groups, y, stats, bn_weight, eps, needs_grad, tiles, grad_y_scale, tail, x_prime)
    if tiles is not None or not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        plan = _plan_conv_bn_bwd(*args)
    else:
        key = (tensor_key(grad_y), tensor_key(grad_scale), tensor_key(grad_shift), tensor_key(x), tensor_key(weight),
               tensor_key(bias), tensor_key(in_scale), tensor_key(in_shift), bool(in_relu), tuple(stride),
               tuple(padding), tuple(dilation), groups, tensor_key(y), tensor_key(stats), tensor_key(bn_weight), eps,
               tuple(bool(v) for v in needs_grad), dot_precision(x.dtype), tensor_key(grad_y_scale), _tail_key(tail),
               tensor_key(x_prime))
        plan = _CONV_BN_BWD_PLANS.get(key) or _CONV_BN_BWD_PLANS.put(key, _plan_conv_bn_bwd(*args))
    geo, needs = plan.geo, list(plan.needs)
    need_x, need_w, need_b, need_isc, need_ish = plan.need_inputs
    if plan.composed:
        if grad_y is not None and grad_y_scale is not None:  # (rare: no weight gradient, or an empty batch)
            grad_y = (grad_y.to(grad_y_scale.dtype) * grad_y_scale.view(1, -1, 1, 1)).to(grad_y.dtype)
        # the composition on this backend's own kernels (pe_kernels.triton: imported, it is what calls us)
        return composed_conv_bn_train_backward(sys.modules[__package__], grad_y, grad_scale, grad_shift, x, weight,
                                               bias, in_scale, in_shift, in_relu, stride, padding, dilation, groups, y,
                                               stats, bn_weight, eps, needs), None

    device = x.device
    if grad_y is None:  # zero: a cached zero read through all-zero strides (no launch)
        grad_y = _zero_grad_y((geo.N, geo.K, geo.P, geo.Q), device)
    if plan.cast:  # (the plan knows: its key holds their dtypes and strides)
        grad_scale = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
        grad_shift = None if grad_shift is None else grad_shift.to(torch.float32).contiguous()
        grad_y_scale = None if grad_y_scale is None else grad_y_scale.to(torch.float32).contiguous()
        stats = stats.contiguous()
        bn_weight = None if bn_weight is None else bn_weight.contiguous()
    if grad_scale is None or grad_shift is None:  # an absent one is zero: a cached zero vector (no launch)
        zeros = identity_vector(0.0, geo.K, device)
        grad_scale = zeros if grad_scale is None else grad_scale
        grad_shift = zeros if grad_shift is None else grad_shift
    on_load = GaccOnLoad(
        y, grad_scale, grad_shift, stats,
        identity_vector(1.0, geo.K, device) if bn_weight is None else bn_weight, geo.N * geo.P * geo.Q, eps,
        torch.empty(geo.K, dtype=torch.float32 if bn_weight is None else bn_weight.dtype, device=device),
        torch.empty(geo.K, dtype=torch.float32, device=device),
        torch.empty(geo.K, dtype=bias.dtype, device=device) if need_b else None, grad_y_scale,
        recompute_y_allowed(geo, bias, tiles),
        torch.empty((3, geo.K), dtype=torch.float32, device=device))
    need_dgrad = need_x or need_isc or need_ish
    wplan, dmeta, w_first, n_sem = plan.gemms
    # Persistent zeroed counters (their last programs reset them); the wgrad, then the dgrad, on this stream.
    sems = stream_counters(max(n_sem, 4), device)
    grads: list[Optional[Tensor]] = [None] * 7
    # g_acc stored by the wgrad for the dgrad (channels_last), or formed on load by both (_plan_conv_bn_bwd)
    gacc = empty_channels_last((geo.N, geo.K, geo.P, geo.Q), x.dtype, device) if plan.wgrad.meta["STORE_GACC"] else None
    wx, *w_prologue = _wgrad_input(x, in_scale, in_shift, in_relu, x_prime)
    grads[1] = _wgrad(grad_y, wx, weight, *w_prologue, geo, wplan, sems[w_first:] if w_first else sems, on_load,
                      plan.wgrad, gacc)
    grads[2] = on_load.d_bias
    tail_sums = None
    if need_dgrad:
        dx, in_sums = _dgrad(grad_y if gacc is None else gacc, weight, x, in_scale, in_shift, in_relu, geo, need_x,
                             need_isc or need_ish, dmeta, sems, tiles, on_load if gacc is None else None, plan.dgrad,
                             tail)
        grads[0] = dx
        if tail is not None:
            tail_sums = in_sums
        else:
            if need_isc:
                grads[3] = in_sums[0]
            if need_ish:
                grads[4] = in_sums[1]
    if needs[5] and bn_weight is not None:
        grads[5] = on_load.d_bn_weight
    if needs[6]:
        grads[6] = on_load.d_bn_bias
    return grads, tail_sums


def conv_bn_train_backward(grad_y: Optional[Tensor], grad_scale: Optional[Tensor], grad_shift: Optional[Tensor],
                           x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                           in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], groups: int, y: Tensor, stats: Tensor,
                           bn_weight: Optional[Tensor], eps: float, needs_grad: Sequence[bool], *,
                           x_prime: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Triton implementation of pe_kernels.reference.conv_bn_train_backward (same arguments, same results:
    CONV_BN_GRAD_NAMES, None where not needed or absent); two launches on the fast path (conv_bn_bwd). `x_prime`:
    the x' the forward stored (conv_bn_train(x_prime=True)), read by the wgrad."""
    return conv_bn_bwd(grad_y, grad_scale, grad_shift, x, weight, bias, in_scale, in_shift, in_relu, stride, padding,
                       dilation, groups, y, stats, bn_weight, eps, needs_grad, x_prime=x_prime)
