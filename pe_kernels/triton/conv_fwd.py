"""Fused grouped convolution, forward: one implicit GEMM per group, all groups in one launch.

Math (pe_kernels.reference.conv_fused)::

    x'[n,c,h,w] = act_in(x * in_scale[c] + in_shift[c])      only at in-bounds positions: padding stays 0
    acc[n,k,p,q] = sum_{c in group(k), r, s} x'[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] * w[k, c - c0, r, s]
                   + bias[k]
    y = act_out(acc * out_scale[k] + out_shift[k] + residual[n,k,p,q])     stored in x.dtype
    stats[0,k] = mean_k = sum_{n,p,q} acc_s / n,  stats[1,k] = m2_k = sum_{n,p,q} (acc_s - mean_k)**2    fp32
                 acc_s = acc rounded to the stored dtype and back (acc.to(y dtype).to(fp32); acc in fp32)

GEMM view, per group g: rows m = (n, p, q) (M = N*P*Q), columns k in [g*K_g, (g+1)*K_g), reduction index
j = (r, s, c) flattened with c fastest (RSC = R*S*C_g), so a narrow group (C_g of 8) with a 3x3 filter fills a
BLOCK_K tile of 64 in one step instead of nine mostly-empty steps. Grid: (M tiles, groups * K_g tiles).
The weight is read in KRSC order (channels_last; `krsc` copies a KCRS 3x3 weight), so its loads along c are
contiguous for every filter size.
Tensors are addressed through their strides (NCHW, channels_last and sliced inputs all work without a copy;
NHWC gives contiguous loads along c and k). The output is channels_last.

Statistics are stable and deterministic. Each M tile computes, from its fp32 accumulator in registers, its
count c_t of valid rows, mean_t and M2_t = sum (acc - mean_t)^2 over those rows (two passes: the mean, then
the deviations, whose own sum also corrects the mean's rounding; no cancellation), and writes
[c_t, mean_t, M2_t] to its own slot of a (cdiv(M, PART_M), 3, K) fp32 buffer. In the same launch the slots are
merged in two levels with Chan et al.'s formula in fixed orders (no atomics on values), skipping slots of count 0:
    n = nA + nB,  d = meanB - meanA,  mean = meanA + d nB / n,  M2 = M2A + M2B + d^2 nA nB / n
(BLOCK_S slots at once in its k-way form, the blocks folded in slot order: `_merge_slots`): the last M tile of each
chunk of CHUNK_SLOTS slots to finish (an int32 counter per chunk and column block, _common.last_arrival) merges the
chunk into a level-2 slot after the slots, and the last chunk of each column block merges those in chunk order and
writes the (2, K) stats (one chunk: its merge is the stats). The order does not depend on which program is last:
the same bits whatever the completion order. (One program merging all slots of its column block, as before, was a
serial tail of ~190 us at batch 128 on an H100.)
The buffer's layout does not depend on the autotune config and every config writes all of it (store_part: a
program's first slot gets its values, its other slots zeros, i.e. count 0), so autotune trials leave nothing
stale and the buffer needs no zeroing; each trial merges again and the last run (the winning config's) writes the
stats. The counters cost no launch: a persistent buffer per (device, stream) (_common.stream_counters), at 0 between
launches because each last program resets its own. `merge_stats` (`_stats_merge_kernel`, the same `_merge_slots`
in a launch of its own) merges a partial buffer apart (tests).

Training conv -> BatchNorm in one launch (FINALIZE, `conv_bn_train`): right after merging its column block's stats,
the last program of the block finalizes those channels as bn_train_finalize does (bn_finalize.py's
`finalize_channels`: scale, shift, the running update), from the merged (mean, m2) still in its registers.
num_batches_tracked is bumped once: each finalizing program reads it (f = 1/(nbt + 1) for the cumulative average)
before it arrives at one more counter (index groups * column blocks, reset by its last arrival), and the last to
arrive stores nbt + 1. Autotune trials would repeat these in-place updates: the autotuner restores the running
statistics and num_batches_tracked after each trial (restore_value), so only the winner's run counts.

Dtypes: fp16/bf16/fp32 activations (weight in the same dtype), fp32 accumulation; fp32 operands use TF32 when
torch.backends.cudnn.allow_tf32 is set. Vectors (bias, scales, shifts) of any float dtype, read as fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import (CHUNK_SLOTS, INTERPRET, LaunchPlans, Tensor, advance_tap, affine_pair, apply_prologue, capturing,
                      cdiv, channels_last_strides, check_4d, check_activation_dtype, check_same_device, check_shape,
                      check_vector, chunk_counters, divisor_magic, dot_acc, dot_precision, dummy, empty_channels_last,
                      fast_div, gpu_tap_tile_k, gpu_tile_n, krsc, krsc_strides, last_arrival, launch, next_pow2,
                      pack_groups, pair, part_rows, pow2_tile, prologue_values, slot_chunk, slot_chunks, store_part,
                      stream_counters, strides4, tap_steps, tensor_key, upcast_bf16)
from .bn_finalize import check_train_args, check_train_count, finalize_channels, running_factor

_INTERPRET_BLOCK_M = 128  # the interpreter's single configuration
# Slots per step of the in-kernel statistics merge, every layer and config (one value: one compile): three
# (MERGE_SLOTS x BLOCK_N) fp32 tiles, 96 registers per thread at BLOCK_N = 128 and 4 warps.
MERGE_SLOTS = 32


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one grouped convolution (checked), shared by the forward and backward launchers."""
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    P: int
    Q: int
    groups: int
    C_g: int
    K_g: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    dtype: torch.dtype  # the activations' (with R*S*C_g, it sets the GEMMs' reduction tile on a GPU: gpu_tile_k)


def conv_geometry(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int) -> ConvGeometry:
    """Check a convolution's arguments (ValueError/TypeError naming the values) and return its sizes."""
    check_4d("x", x)
    check_4d("weight", weight)
    check_activation_dtype("x", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal the input dtype {x.dtype}")
    check_same_device(x.device, weight=weight)
    groups = int(groups)
    N, C, H, W = x.shape
    K, C_g, R, S = weight.shape
    if min(K, C_g, R, S) < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)} (K, C/groups, R, S): every dimension must be "
                         ">= 1 (kernel size should be greater than zero)")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if C % groups != 0 or K % groups != 0:
        raise ValueError(f"in_channels={C} and out_channels={K} must both be divisible by groups={groups}")
    if C_g != C // groups:
        raise ValueError(f"weight has {C_g} input channels per group, expected in_channels/groups = "
                         f"{C}/{groups} = {C // groups}")
    stride = pair("stride", stride, 1)
    padding = pair("padding", padding, 0)
    dilation = pair("dilation", dilation, 1)
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    if P < 1 or Q < 1:
        raise ValueError(f"output size ({P}, {Q}) is empty for input ({H}, {W}), kernel ({R}, {S}), "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    if max(N * H * W, N * P * Q) >= 2**31:
        raise ValueError(f"N*H*W = {N * H * W} and N*P*Q = {N * P * Q} must stay below 2**31 (row indices are "
                         "32-bit; element offsets are 64-bit)")
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, groups, C // groups, K // groups, stride, padding, dilation,
                        x.dtype)


# Arguments that do not help code generation: not specialised on (value 1, divisibility by 16), so that
# layers differing only in spatial size or conv geometry share one compiled kernel. Strides, channel counts
# and RSC stay specialised: a unit channel stride and 16-divisible row strides give vectorised NHWC loads.
_NOT_SPECIALIZED = ["H", "W", "P", "Q", "M", "S", "M_KEY", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H",
                    "DIL_W", "srm", "srv", "running", "has_nbt", "cumulative"]
_NOT_SPECIALIZED_FWD = _NOT_SPECIALIZED + ["CG_MAGIC", "CG_SHIFT", "S_MAGIC", "S_SHIFT"]


@triton.jit(do_not_specialize=_NOT_SPECIALIZED_FWD)
def _conv_fwd_kernel(
    x_ptr,          # input (N, C, H, W), any strides
    w_ptr,          # weight (K, C_g, R, S), any strides
    bias_ptr,       # (K,) or unused
    in_scale_ptr,   # (C,) prologue scale (contiguous) or unused
    in_shift_ptr,   # (C,) prologue shift (contiguous) or unused
    out_scale_ptr,  # (K,) epilogue scale (contiguous) or unused
    out_shift_ptr,  # (K,) epilogue shift (contiguous) or unused
    res_ptr,        # residual (N, K, P, Q), any strides, or unused
    y_ptr,          # output (N, K, P, Q), any strides; its element type is the stored dtype
    part_ptr,       # (cdiv(M, PART_M) + chunks, 3, K) fp32 contiguous per-slot [count, mean, M2], then the
                    # chunks' level-2 slots (slot_chunks), or unused
    stats_ptr,      # out: (2, K) fp32 contiguous [mean, m2] (STATS), or unused
    sem_ptr,        # (chunk_counters(groups * column blocks, chunks),) int32 counters, 0 at launch, left at 0
                    # (STATS): the column blocks', FINALIZE's num_batches_tracked one, the chunks'
    bn_w_ptr,       # (K,) BN weight (gamma; cached ones when absent), contiguous (FINALIZE), or unused
    bn_b_ptr,       # (K,) BN bias (beta; cached zeros when absent), contiguous (FINALIZE), or unused
    scale_ptr,      # out: (K,) fp32 contiguous BN scale (FINALIZE), or unused
    shift_ptr,      # out: (K,) fp32 contiguous BN shift (FINALIZE), or unused
    rmean_ptr,      # in/out: running_mean (K,), any stride and float dtype (FINALIZE and running), or unused
    rvar_ptr,       # in/out: running_var (K,), likewise
    nbt_ptr,        # in/out: num_batches_tracked, one integer (FINALIZE and has_nbt), or an int64 dummy
    xp_ptr,         # out (STORE_XP): x' (N, C, H, W) channels_last in x's dtype, row m at m * xp_row; else unused
    H, W, K, P, Q, M,            # input height/width, output channels, output height/width, M = N*P*Q
    C_g, K_g, S, RSC,            # channels per group (in/out), filter width, R*S*C_g
    M_KEY,                       # M rounded up to a power of two: the autotune key (unused in the body)
    CG_MAGIC, CG_SHIFT, S_MAGIC, S_SHIFT,   # divisor_magic(C_g), divisor_magic(S) (fast_div)
    sxn, sxc, sxh, sxw,          # x strides (elements)
    swk, swc, swr, sws,          # weight strides
    srn, src, srh, srw,          # residual strides
    syn, syc, syh, syw,          # y strides
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,   # conv geometry
    srm, srv,                    # running_mean / running_var strides (FINALIZE; 1 when unused)
    count, eps, momentum,        # BN: values per channel (float M), epsilon, running factor f unless cumulative
    running, has_nbt, cumulative,   # runtime flags (FINALIZE): update running stats; bump nbt; f = 1/nbt
    xp_row,                      # STORE_XP: C, x''s row stride
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,      # x' = x * in_scale + in_shift (then ReLU if IN_RELU)
    IN_RELU: tl.constexpr,
    EPILOGUE: tl.constexpr,      # y = acc * out_scale + out_shift (+ residual if HAS_RES, then ReLU if OUT_RELU)
    HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr,
    STATS: tl.constexpr,         # write the per-slot statistics and merge them into stats
    FINALIZE: tl.constexpr,      # STATS and, in the merging programs, BN's finalize of their columns (conv_bn_train)
    UPCAST: tl.constexpr,        # cast dot operands to fp32 (bf16 under the interpreter)
    PRECISION: tl.constexpr,     # tl.dot input_precision: "tf32" or "ieee"
    TAP_STEPS: tl.constexpr,     # every reduction step is full and in one filter tap (tap_steps: C_g % BLOCK_K == 0)
    EVEN_N: tl.constexpr,        # K_g % BLOCK_N == 0: no output-column mask
    TRANS_ACC: tl.constexpr,     # acc^T = w^T x'^T: x' (formed in registers: PROLOGUE) is the MMA's B operand, read
                                 # from shared memory (asynchronous wgmma; as A it was a register operand waited for
                                 # at every step): fp16 sm_90, a 32-channel 3x3 training forward 332 -> 300 SASS a step;
                                 # with STATS, a column's rows in the MMA's N: per-tile sums inside a warp
    PRO_ONCE: tl.constexpr,      # (PROLOGUE, TAP_STEPS) C_g == BLOCK_K: every step reads the same channels
    PACK: tl.constexpr,          # groups per program, 1 or 2 (pack_groups: TAP_STEPS, BLOCK_N = 2 K_g): a step's rows,
                                 # bounds and offsets serve both groups' loads and products (two exact products into
                                 # two accumulators, joined for the epilogue: group g's columns, then g + 1's)
    FAST_DIV_J: tl.constexpr,    # (not TAP_STEPS) C_g % 16 != 0: split j with fast_div (CG_MAGIC, S_MAGIC)
    STORE_XP: tl.constexpr,      # (PROLOGUE, TAP_STEPS, stride 1, P = H, Q = W) the programs of column block 0 store
                                 # x' at their rows' own input positions after the loop (stores_x_prime): the x'
                                 # the backward's wgrad reads instead of forming it again
    PART_M: tl.constexpr,        # rows per statistics slot (BLOCK_M is a multiple of it)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,       # slots per step of the statistics merge (MERGE_SLOTS)
    CHUNK: tl.constexpr,         # slots per chunk of the two-level merge (CHUNK_SLOTS)
):
    pid_m = tl.program_id(0)
    pid_gn = tl.program_id(1)
    num_n = tl.cdiv(K_g * PACK, BLOCK_N)
    g = pid_gn // num_n * PACK   # the program's (first) group
    pid_n = pid_gn % num_n
    SUB_N: tl.constexpr = BLOCK_N // PACK   # one group's columns (PACK > 1: all K_g of them)

    # Rows: output positions m = (n, p, q).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    h0 = p * STRIDE_H - PAD_H
    w0 = q * STRIDE_W - PAD_W
    # the rows' pointers at tap (0, 0) (out of the tensor for padded rows: masked), and H, W unsigned
    x_tap0 = x_ptr + n.to(tl.int64) * sxn + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
    H_U = tl.cast(H, tl.uint32)
    W_U = tl.cast(W, tl.uint32)

    # Columns: output channels k of group g (PACK groups: g's and g + 1's, contiguous).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:   # every column block full: no column mask (fewer selects per async copy)
        mask_n = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        mask_n = offs_n < K_g
    k = g * K_g + offs_n
    if PACK == 1:
        mask_b = mask_n
        w_cols = w_ptr + k.to(tl.int64) * swk
    else:   # the B tile of group g (g + 1's: K_g rows of the weight further)
        mask_b = tl.full((SUB_N,), 1, tl.int1)
        w_cols = w_ptr + (g * K_g + tl.arange(0, SUB_N)).to(tl.int64) * swk
    if TAP_STEPS:
        # the operands' loop-invariant pointers (the group's first BLOCK_K channels at tap (0, 0)); a step adds one
        # scalar offset (its tap and channels): one 64-bit add per vector
        c_inv = (g * C_g + tl.arange(0, BLOCK_K)).to(tl.int64)
        a_inv = x_tap0[:, None] + (c_inv * sxc)[None, :]
        b_inv = w_cols[None, :] + (tl.arange(0, BLOCK_K) * swc)[:, None]

    # every step reads the same channels: the prologue's scale and shift loaded once (not beside 256 x 64 A tiles:
    # they spilled 4 B in bf16 with Triton 3.9)
    HOIST: tl.constexpr = PRO_ONCE and (BLOCK_M <= 128 or BLOCK_K <= 32)
    if HOIST:
        pro_c = g * C_g + tl.arange(0, BLOCK_K)
        pro_scale = tl.load(in_scale_ptr + pro_c).to(tl.float32)
        pro_shift = tl.load(in_shift_ptr + pro_c).to(tl.float32)
        if PACK == 2:
            pro_scale1 = tl.load(in_scale_ptr + pro_c + C_g).to(tl.float32)
            pro_shift1 = tl.load(in_shift_ptr + pro_c + C_g).to(tl.float32)
    if TRANS_ACC:
        acc = tl.zeros((SUB_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    if PACK == 2:
        acc1 = tl.zeros_like(acc)
    # TAP_STEPS: the step's (r, s) and first channel c0, carried from step to step as scalars (no division)
    c0 = 0
    r_t = 0
    s_t = 0
    for j0 in range(0, RSC, BLOCK_K):
        if TAP_STEPS:
            # The step lies in one filter tap (r_t, s_t), channels c0 .. c0 + BLOCK_K - 1: bounds and offsets per
            # row, one add per element.
            c_l = c0 + tl.arange(0, BLOCK_K)
            mask_j = tl.full((BLOCK_K,), 1, tl.int1)   # every step full: the rows' bounds are the whole mask
            c = g * C_g + c_l
            # the tap moves every row by the same offset: a scalar added to the rows' loop-invariant pointers; one
            # unsigned compare per dimension bounds h and w (a negative index wraps to >= 2^31 > H)
            dh = r_t * DIL_H
            dw = s_t * DIL_W
            row_ok = mask_m & ((h0 + dh).to(tl.uint32) < H_U) & ((w0 + dw).to(tl.uint32) < W_U)
            in_bounds = row_ok[:, None] & mask_j[None, :]
            a_ptrs = a_inv + (dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw + tl.cast(c0, tl.int64) * sxc)
            b_ptrs = b_inv + (c0 * swc + r_t * swr + s_t * sws)
            c0, s_t, r_t = advance_tap(c0, s_t, r_t, BLOCK_K, C_g, S)
        else:
            # Reduction index j = (r, s, c_local), c fastest: a step may span taps (narrow groups).
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < RSC
            if FAST_DIV_J:   # (a high multiply, not a 32-bit division: the stem's 3 channels, odd groups)
                rs = fast_div(offs_j, C_g, CG_MAGIC, CG_SHIFT)
                c_l = offs_j - rs * C_g
                r = fast_div(rs, S, S_MAGIC, S_SHIFT)
                s = rs - r * S
            else:   # C_g a multiple of 16: % and // let the compiler see c contiguous (16-byte loads); fast_div hid it
                c_l = offs_j % C_g
                rs = offs_j // C_g
                r = rs // S
                s = rs % S
            c = g * C_g + c_l
            # the element at the rows' tap-(0, 0) pointers plus its column's offset (one 64-bit add per element, not
            # two 64-bit products: the stem's one step 627 -> 470 SASS, fp16 sm_90); one unsigned compare bounds h, w
            dh = r * DIL_H
            dw = s * DIL_W
            in_bounds = (mask_m[:, None] & mask_j[None, :] & ((h0[:, None] + dh[None, :]).to(tl.uint32) < H_U)
                         & ((w0[:, None] + dw[None, :]).to(tl.uint32) < W_U))
            a_ptrs = x_tap0[:, None] + (c.to(tl.int64) * sxc + dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw)[None, :]
            b_ptrs = w_cols[None, :] + (c_l * swc + r * swr + s * sws)[:, None]
        a = tl.load(a_ptrs, mask=in_bounds, other=0.0)
        if PROLOGUE:
            if HOIST:   # (a tap step: the padding is per row)
                a = prologue_values(a, pro_scale, pro_shift, row_ok[:, None], IN_RELU)
            else:
                a = apply_prologue(a, in_scale_ptr, in_shift_ptr, c, mask_j, in_bounds, IN_RELU)
        b = tl.load(b_ptrs, mask=mask_j[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = dot_acc(a, b, acc, TRANS_ACC, PRECISION)
        if PACK == 2:   # group g + 1: C_g channels and K_g filters further, the same rows and masks
            a1 = tl.load(a_ptrs + C_g * sxc, mask=in_bounds, other=0.0)
            if PROLOGUE:
                if HOIST:
                    a1 = prologue_values(a1, pro_scale1, pro_shift1, row_ok[:, None], IN_RELU)
                else:
                    a1 = apply_prologue(a1, in_scale_ptr, in_shift_ptr, c + C_g, mask_j, in_bounds, IN_RELU)
            b1 = tl.load(b_ptrs + K_g * swk, mask=mask_j[:, None] & mask_b[None, :], other=0.0)
            if UPCAST:
                a1 = a1.to(tl.float32)
                b1 = b1.to(tl.float32)
            acc1 = dot_acc(a1, b1, acc1, TRANS_ACC, PRECISION)
    if TRANS_ACC:
        acc = tl.trans(acc)
    if PACK == 2:   # (BLOCK_M, 2 K_g): group g's columns, then g + 1's
        if TRANS_ACC:
            acc1 = tl.trans(acc1)
        acc = tl.reshape(tl.permute(tl.join(acc, acc1), (0, 2, 1)), (BLOCK_M, BLOCK_N))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + k, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STATS:
        # [count, mean, M2] of this tile's valid rows (rows past M would carry the bias: dropped), two passes
        # over the accumulator in registers. Columns past K_g are not stored. The grid gives every program >= 1
        # valid row.
        # The statistics describe acc as stored: rounded to y's dtype (identity in fp32), as the BN apply reads it.
        acc_s = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean_t = tl.sum(tl.where(mask_m[:, None], acc_s, 0.0), axis=0) / rows
        dev = tl.where(mask_m[:, None], acc_s - mean_t[None, :], 0.0)
        # Corrected two-pass (Chan, Golub & LeVeque): the deviations' own sum fixes the rounding of mean_t.
        dev_sum = tl.sum(dev, axis=0)
        m2_t = tl.maximum(tl.sum(dev * dev, axis=0) - dev_sum * dev_sum / rows, 0.0,
                          propagate_nan=tl.PropagateNan.ALL)   # >= 0 as m2 is (a NaN stays NaN)
        store_part(part_ptr, pid_m, M, 3 * K, k, mask_n, tl.zeros_like(mean_t) + rows, PART_M, BLOCK_M)
        store_part(part_ptr + K, pid_m, M, 3 * K, k, mask_n, mean_t + dev_sum / rows, PART_M, BLOCK_M)
        store_part(part_ptr + 2 * K, pid_m, M, 3 * K, k, mask_n, m2_t, PART_M, BLOCK_M)

    z = acc
    if EPILOGUE:
        z = z * tl.load(out_scale_ptr + k, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        z = z + tl.load(out_shift_ptr + k, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    n64 = n.to(tl.int64)
    p64 = p.to(tl.int64)
    q64 = q.to(tl.int64)
    k64 = k.to(tl.int64)
    if HAS_RES:
        res_ptrs = res_ptr + (n64 * srn + p64 * srh + q64 * srw)[:, None] + (k64 * src)[None, :]
        z = z + tl.load(res_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    if OUT_RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y_ptrs = y_ptr + (n64 * syn + p64 * syh + q64 * syw)[:, None] + (k64 * syc)[None, :]
    tl.store(y_ptrs, z.to(y_ptr.dtype.element_ty), mask=mask_out)
    if STORE_XP:
        # x' at the rows' own input positions (stride 1, P = H, Q = W: the tap at (PAD_H, PAD_W)), every channel of the
        # program's groups, formed as the loop formed it, by the programs of column block 0; after the loop and the
        # y store (a store of the loop's own x' tile made its product a register-operand mma.sync; its registers are
        # free here)
        if pid_n == 0:
            x_own = x_ptr + n64 * sxn + p64 * sxh + q64 * sxw   # (h, w) = (p, q)
            xp_rows = xp_ptr + offs_m.to(tl.int64) * xp_row
            XP_C: tl.constexpr = min(BLOCK_K, 32)   # channels a step (64 spilled 44 B beside 256-row tiles)
            for cx in range(0, C_g * PACK, XP_C):
                cc = g * C_g + cx + tl.arange(0, XP_C)
                all_c = tl.full((XP_C,), 1, tl.int1)
                xo = tl.load(x_own[:, None] + (cc.to(tl.int64) * sxc)[None, :], mask=mask_m[:, None], other=0.0)
                xo = apply_prologue(xo, in_scale_ptr, in_shift_ptr, cc, all_c, mask_m[:, None], IN_RELU)
                tl.store(xp_rows[:, None] + cc[None, :], xo, mask=mask_m[:, None])
    if STATS:  # after the y store: the accumulator is dead, its registers free for the merge
        _merge_if_last(part_ptr, stats_ptr, sem_ptr, bn_w_ptr, bn_b_ptr, scale_ptr, shift_ptr, rmean_ptr, rvar_ptr,
                       nbt_ptr, K, K_g * PACK, M, srm, srv, count, eps, momentum, running, has_nbt, cumulative,
                       FINALIZE, PART_M, BLOCK_M, BLOCK_S, BLOCK_N, CHUNK)


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) partials; a side of count 0 is skipped (the other is
    returned as it is, so an inf or NaN is never multiplied by a zero weight)."""
    n = n_a + n_b
    f = n_b / tl.maximum(n, 1.0)
    d = mean_b - mean_a
    mean = tl.where(n_b == 0, mean_a, tl.where(n_a == 0, mean_b, mean_a + d * f))
    m2 = tl.where(n_b == 0, m2_a, tl.where(n_a == 0, m2_b, m2_a + m2_b + d * d * n_a * f))
    return n, mean, m2


@triton.jit
def _merge_slots(part_ptr, n_slots, K, offs_k, mask_k, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """(count, mean, m2) of columns `offs_k` (BLOCK_K of them, `mask_k`ed) from the (n_slots, 3, K) fp32 contiguous
    per-slot [count, mean, M2]. Each step loads BLOCK_S slots and merges them at once with the k-way form of Chan's
    formula, two passes over the registers (n_b = sum c, mean_b = sum c mean / n_b plus its rounding corrected with
    the deviations, M2_b = sum M2 + c (mean - mean_b)^2: no cancellation), then folds (n_b, mean_b, M2_b) into the
    running total with the pairwise formula, steps in slot order. Slots of count 0 (and the masked tail) are skipped,
    whatever they hold. A fixed order whoever runs it; the loads bypass L1 (.cg): a merging program (last_arrival)
    reads what the other programs of its launch wrote."""
    n = tl.zeros((BLOCK_K,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_K,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < n_slots)[:, None] & mask_k[None, :]
        ptrs = part_ptr + (offs_s.to(tl.int64) * 3 * K)[:, None] + offs_k[None, :]
        c = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        used = c > 0
        mu = tl.load(ptrs + K, mask=mask, other=0.0, cache_modifier=".cg")
        q = tl.load(ptrs + 2 * K, mask=mask, other=0.0, cache_modifier=".cg")
        n_b = tl.sum(c, axis=0)
        w = c / tl.maximum(n_b, 1.0)[None, :]
        mean_b = tl.sum(tl.where(used, w * mu, 0.0), axis=0)
        mean_b += tl.sum(tl.where(used, w * (mu - mean_b[None, :]), 0.0), axis=0)   # the sum's rounding, corrected
        dev = mu - mean_b[None, :]
        m2_b = tl.sum(tl.where(used, q + c * dev * dev, 0.0), axis=0)
        n, mean, m2 = _chan_combine(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@triton.jit(noinline=True)
def _merge_if_last(part_ptr, stats_ptr, sem_ptr, bn_w_ptr, bn_b_ptr, scale_ptr, shift_ptr, rmean_ptr, rvar_ptr,
                   nbt_ptr, K, K_g, M, srm, srv, count, eps, momentum, running, has_nbt, cumulative,
                   FINALIZE: tl.constexpr, PART_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """stats[:, columns of this program's column block] (K_g: the columns of a program's groups, K_g * PACK) from the
    (cdiv(M, PART_M), 3, K) partials, merged in two
    levels: the last M tile of each chunk of CHUNK slots to arrive at the chunk's counter merges the chunk's slots
    (_merge_slots, slot order) and, with more than one chunk, stores [count, mean, M2] in the chunk's level-2 slot
    (after the slots) and arrives at the column block's counter, whose last program merges the level-2 slots in chunk
    order (the same bits whichever program is last); counters reset by their last programs. A function of its own,
    counters included: its registers do not add to the GEMM's (inlined, or with the counter in the kernel, the
    4-warp 128-column config spilled ~200 bytes more for sm_90 with Triton 3.9's ptxas; as it is, ~16).

    FINALIZE: then, in the program holding the merged (mean, m2), BN's finalize of the same columns (bn_finalize's
    `finalize_channels`). num_batches_tracked is bumped once per launch: each finalizing program reads it (for
    f = 1 / (nbt + 1) when cumulative) BEFORE it arrives at a second counter, sem[column blocks]; the last to arrive
    there, after every other finalizer has read it (acq_rel), stores nbt + 1 and resets that counter."""
    pid_gn = tl.program_id(1)
    n_cols = tl.num_programs(1)
    num_n = tl.cdiv(K_g, BLOCK_N)
    offs = (pid_gn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < K_g
    k = (pid_gn // num_n) * K_g + offs
    n_slots = tl.cdiv(M, PART_M)
    n_chunks = tl.cdiv(n_slots, CHUNK)
    chunk, arrivals, first, n_in = slot_chunk(tl.program_id(0), tl.num_programs(0), 0, n_slots,
                                              CHUNK * PART_M // BLOCK_M, CHUNK)
    csem = sem_ptr + n_cols + 1 + pid_gn * n_chunks + chunk
    chunk_last = last_arrival(csem, arrivals)
    final = chunk_last & (n_chunks == 1)
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if chunk_last:
        tl.store(csem, 0)
        n, mean, m2 = _merge_slots(part_ptr + tl.cast(first, tl.int64) * 3 * K, n_in, K, k, mask, BLOCK_S, BLOCK_N)
        if n_chunks > 1:
            level2 = part_ptr + tl.cast(n_slots, tl.int64) * 3 * K
            dst = level2 + tl.cast(chunk, tl.int64) * 3 * K + k
            tl.store(dst, n, mask=mask)
            tl.store(dst + K, mean, mask=mask)
            tl.store(dst + 2 * K, m2, mask=mask)
            final = last_arrival(sem_ptr + pid_gn, n_chunks)
            if final:
                tl.store(sem_ptr + pid_gn, 0)
                _, mean, m2 = _merge_slots(level2, n_chunks, K, k, mask, BLOCK_S, BLOCK_N)
    if final:
        tl.store(stats_ptr + k, mean, mask=mask)
        tl.store(stats_ptr + K + k, m2, mask=mask)
        if FINALIZE:
            nbt = tl.load(nbt_ptr) + 1   # the count after this launch's bump (an int64 dummy's 0 when absent)
            finalize_channels(mean, m2, k, mask, count, eps, running_factor(nbt, momentum, cumulative), bn_w_ptr, 1,
                              bn_b_ptr, 1, scale_ptr, shift_ptr, rmean_ptr, srm, rvar_ptr, srv, 1, running)
            if has_nbt != 0:
                if last_arrival(sem_ptr + n_cols, n_cols):
                    tl.store(nbt_ptr, nbt)
                    tl.store(sem_ptr + n_cols, 0)


@triton.jit(do_not_specialize=["K", "n_slots", "group"])
def _stats_merge_kernel(
    part_ptr,       # (n_slots, 3, K) fp32 contiguous per-slot [count, mean, M2]
    out_ptr,        # out: COUNTS: (groups, 3, K) fp32 contiguous [count, mean, M2]; else (2, K) [mean, m2]
    K, n_slots,     # channels, slots
    group,          # slots per program along axis 1
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,   # slots per step, channels per program
    COUNTS: tl.constexpr,
):
    """The merge of `_conv_fwd_kernel`'s merging programs in a launch of its own, parallel over channels (axis 0)
    and groups of slots (axis 1: slots g*group .. (g+1)*group - 1 of program g, as conv_fwd's chunks)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    first = tl.program_id(1) * group
    n, mean, m2 = _merge_slots(part_ptr + tl.cast(first, tl.int64) * 3 * K, tl.minimum(n_slots - first, group), K,
                               offs_k, mask_k, BLOCK_S, BLOCK_K)
    if COUNTS:
        dst = out_ptr + tl.cast(tl.program_id(1), tl.int64) * 3 * K + offs_k
        tl.store(dst, n, mask=mask_k)
        tl.store(dst + K, mean, mask=mask_k)
        tl.store(dst + 2 * K, m2, mask=mask_k)
    else:
        tl.store(out_ptr + offs_k, mean, mask=mask_k)
        tl.store(out_ptr + K + offs_k, m2, mask=mask_k)


# The separate merge: one config for every layer (one compile). Under the interpreter, one program and one step.
_MERGE_BLOCKS = dict(BLOCK_S=128, BLOCK_K=32)


def merge_stats(part: Tensor, block_s: Optional[int] = None, block_k: Optional[int] = None,
                num_warps: int = 4, chunk: Optional[int] = None) -> Tensor:
    """(2, K) [mean, m2] from (slots, 3, K) per-slot [count, mean, M2] partials: one launch (zeros for 0 slots); with
    `chunk`, in two levels as conv_fwd merges (chunks of `chunk` slots merged into (chunks, 3, K), then those: two
    launches where there is more than one chunk). Not on conv_fwd's path (its kernel merges in place); for tests and
    tools. `block_s` (slots per step) sets the rounding: with MERGE_SLOTS and chunk=CHUNK_SLOTS it gives conv_fwd's
    stats of the same partials bit for bit. On a GPU the order of the sums within a step also follows the register
    layout: the same with block_k = the conv's BLOCK_N, its num_warps and K not a multiple of 16 (the conv kernel
    specialises on K's divisibility and then vectorises the merge's loads; this kernel does not)."""
    n_slots, _, K = part.shape
    if n_slots == 0:
        return torch.zeros((2, K), dtype=torch.float32, device=part.device)
    stats = torch.empty((2, K), dtype=torch.float32, device=part.device)  # every element written
    blocks = (dict(BLOCK_S=pow2_tile(n_slots, 16, 256), BLOCK_K=pow2_tile(K, 16, 256)) if INTERPRET
              else dict(_MERGE_BLOCKS))
    if block_s is not None:
        blocks["BLOCK_S"] = int(block_s)
    if block_k is not None:
        blocks["BLOCK_K"] = int(block_k)
    cols = cdiv(K, blocks["BLOCK_K"])
    if chunk is not None and n_slots > chunk:
        level2 = torch.empty((cdiv(n_slots, chunk), 3, K), dtype=torch.float32, device=part.device)
        _stats_merge_kernel[(cols, level2.shape[0])](part, level2, K, n_slots, int(chunk), **blocks, COUNTS=True,
                                                     num_warps=num_warps)
        part, n_slots = level2, level2.shape[0]
    _stats_merge_kernel[(cols, 1)](part, stats, K, n_slots, n_slots, **blocks, COUNTS=False, num_warps=num_warps)
    return stats


# GPU configs: two, so that a model's first step compiles few kernels (each config is one compile per
# specialisation): 128 rows on 8 warps (two warpgroups of wgmma m64 on sm_90) or 64 rows on 4 (one). With the
# 64-column tiles (gpu_tile_n) and the dtype's reduction tile (gpu_tile_k), neither spills at any Table 8 shape, dtype
# or flag set on sm_90 (bench/kernel_audit.py); 128 rows on 4 warps and 128-column tiles did (up to ~2 KB with the
# prologue and the finalize, ~4 KB in fp32), and 128 x 128 fp32 tiles also overflowed the dgrad's shared memory.
GPU_CONFIGS = [triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
               triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)]
# The forward's list adds 256 rows on 8 warps (two warpgroups of two wgmma m64 each): the loops are issue-bound, and
# a step's fixed work (barriers, the pipeline's waits, the tap's scalars) then serves twice the rows -- 1.3-1.5x the
# loop SASS for 2x the MMA work (fp16 sm_90: a 32-channel 3x3 layer's eval forward 130 -> 85 us modelled, a
# 32-channel 1x1 one's 65 -> 52, bench/kernel_audit.py). It spilled with 128-column tiles, with steps spanning two
# taps (the stem, narrow 1x1 layers with a prologue) and in IEEE fp32, so _fwd_configs offers it only to launches
# with at most 64 columns, full tap steps and tensor-core operands, in place of the 64-row config (which won by < 2 %
# at most there): two trials, two compiles per launch kind as before.
TALL_CONFIG = triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=3)
FWD_CONFIGS = GPU_CONFIGS + [TALL_CONFIG]


def tall_rows(block_n: int, tap_steps: bool, dtype: torch.dtype, precision: str, store_xp: bool = False,
              block_k: int = 0) -> bool:
    """Whether the forward may run 256-row tiles (TALL_CONFIG): <= 64 columns, every reduction step in one tap,
    fp16 / bf16 / TF32 operands; storing x' (STORE_XP) only with steps of <= 32 channels (64-channel steps spilled
    44-48 B beside it, fp16 sm_90 Triton 3.9, bench/kernel_audit.py)."""
    return (block_n <= 64 and bool(tap_steps) and (dtype != torch.float32 or precision == "tf32")
            and not (store_xp and block_k > 32))


def _fwd_configs(configs, named_args, **kwargs):
    """early_config_prune of the forward's autotuner: TALL_CONFIG in place of the 64-row config where tall_rows
    allows it, else the two GPU_CONFIGS (its inputs, BLOCK_N, TAP_STEPS, PRECISION, STORE_XP and x's dtype, are in
    the autotune key, BLOCK_K follows from them and the prologue: a cached choice is one this function offered)."""
    tall = tall_rows(kwargs["BLOCK_N"], kwargs["TAP_STEPS"], named_args["x_ptr"].dtype, kwargs["PRECISION"],
                     kwargs["STORE_XP"], kwargs["BLOCK_K"])
    dropped = GPU_CONFIGS[1] if tall else TALL_CONFIG
    return [c for c in configs if c is not dropped]


# On a GPU: autotuned over warps (BLOCK_N, BLOCK_K follow the group widths), keyed on the GEMM's shape with M
# rounded up to a power of two, its column tile and whether its steps lie in one tap (_fwd_configs' inputs). Under
# the interpreter the launcher calls the plain kernel with one config.
# A FINALIZE launch (conv_bn_train) updates running_mean, running_var and num_batches_tracked in place, and the
# autotuner runs its trials (each config, several times) on the launch's own arguments before the winner's run:
# restore_value makes it copy those three before every trial and put them back after it, so that only the winner's
# run updates them (the other outputs are overwritten whole by every run, the counters are back at 0 after each).
# One wrapper for every launch, so that a layer's train (FINALIZE) and eval launches share one tuning round (FINALIZE
# adds a per-column tail to the same GEMM); the price: without FINALIZE the three are 16-byte dummies, still cloned
# and copied back around each trial (6 tiny launches, the same for every config). (restore_value: Triton >= 3.0.)
RESTORED_ON_TRIALS = ["rmean_ptr", "rvar_ptr", "nbt_ptr"]
_conv_fwd_kernel_tuned = triton.autotune(configs=FWD_CONFIGS,
                                         key=["M_KEY", "K_g", "RSC", "PRECISION", "BLOCK_N", "TAP_STEPS",
                                              "STORE_XP"],
                                         prune_configs_by={"early_config_prune": _fwd_configs},
                                         restore_value=RESTORED_ON_TRIALS)(_conv_fwd_kernel)


def has_prologue(in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool) -> bool:
    return in_scale is not None or in_shift is not None or bool(in_relu)


def fwd_tiles(geo: ConvGeometry, prologue: bool = False, stats: bool = False) -> dict:
    """BLOCK_N and BLOCK_K on a GPU (gpu_tile_n, gpu_tap_tile_k, deep_steps); under the interpreter, tiles that cover
    a tiny test's group in one step."""
    if INTERPRET:  # cost is per program and per loop step: few, large tiles
        return dict(BLOCK_N=pow2_tile(geo.K_g, 16, 128), BLOCK_K=pow2_tile(geo.R * geo.S * geo.C_g, 16, 256))
    block_k = gpu_tap_tile_k(geo.dtype, geo.R * geo.S, geo.C_g)
    block_n = gpu_tile_n(geo.K_g, tap_steps(geo.C_g, block_k), geo.dtype)
    if deep_steps(geo, block_k, block_n, prologue, stats):
        block_k = 2 * block_k
    return dict(BLOCK_N=block_n, BLOCK_K=block_k)


def deep_steps(geo: ConvGeometry, block_k: int, block_n: int, prologue: bool, stats: bool) -> bool:
    """Whether the forward's tap steps go 128 deep instead of 64 (2-byte operands): where 128 divides C_g, the column
    tile is 128 wide and the launch has neither a prologue nor statistics (the eval forward). A step's fixed work
    (barriers, the pipeline's waits and indices, the tap's scalars) then serves twice the MMA work: fp16 sm_90, 144
    -> 223 SASS a step for 2x the work (eval 3x3 layers of 128 and 256 channels 21.5 -> 16.6 us modelled, the 4 x 4
    1x1 ones 9.6 -> 7.4). Three stages of 128 x 128 x 128 tiles take 192 KB of shared memory. Elsewhere they spilled
    (bench/kernel_audit.py): with a prologue (sm_90: 52 B on 8 warps over two channel chunks a tap; over one, 128
    channels, none, 58 -> 50 us, but 252-336 B on sm_80), with the statistics in bf16 (28-40 B, Triton 3.9); and
    256-row tiles with 64 columns would not fit."""
    return block_k == 64 and block_n == 128 and tap_steps(geo.C_g, 128) and not (prologue or stats)


def stores_x_prime(geo: ConvGeometry, meta: dict, prologue: bool) -> bool:
    """Whether a training forward stores the x' it forms (STORE_XP), for the backward's wgrad to read instead of
    forming it again at every tap (its prologue was ~1/3 of its loop: fp16 sm_90, the 3x3 wgrads of 32-, 64- and
    128-channel groups 305 -> 216, 158 -> 116, 124 -> 91 us modelled, bench/kernel_audit.py) for one more read of x
    and one write of x' (the HBM bytes of the step: bench/kernel_audit.py --bytes-csv): a filter of several taps
    with a prologue, tap steps, and a tap that reads every row's own input position (stride 1, output size = input
    size, the padding a multiple of the dilation), and 2-byte operands (fp32's training forwards, at 250-255
    registers, spilled 8-84 B beside it with Triton 3.6 and 3.9)."""
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    own_tap = (sh, sw) == (1, 1) and (geo.P, geo.Q) == (geo.H, geo.W) and ph % dh == 0 and pw % dw == 0
    return (prologue and geo.R * geo.S > 1 and own_tap and ph // dh < geo.R and pw // dw < geo.S
            and tap_steps(geo.C_g, meta["BLOCK_K"]) and geo.dtype != torch.float32)


class BNTrain(NamedTuple):
    """A training BatchNorm after the conv, for conv_fwd(finalize=...): bn_train_finalize's arguments (checked by
    conv_fwd) and its outputs, `scale` and `shift`, (K,) fp32 contiguous tensors the launch fills."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    scale: Tensor
    shift: Tensor


def _finalize_scalars(bn: Optional[BNTrain], K: int, M: int, x: Tensor) -> tuple:
    """The kernel's BN scalar arguments, in its order (dummies' without `bn`). Checks `bn` (the reference's errors:
    an empty batch, count < 2 with running statistics after the num_batches_tracked bump)."""
    if bn is None:
        return (1, 1, 1.0, 0.0, 0.0, 0, 0, 0)
    check_train_args(K, x.device, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                     prefix="bn_")
    for name, out in (("scale", bn.scale), ("shift", bn.shift)):
        if (tuple(out.shape) != (K,) or out.dtype != torch.float32 or not out.is_contiguous()
                or out.device != x.device):
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape ({K},) on {x.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if M == 0:
        raise ValueError("a training BatchNorm needs values: the batch is empty (N*P*Q = 0)")
    running = bn.running_mean is not None
    nbt = bn.num_batches_tracked
    check_train_count(M, running, nbt)
    return (bn.running_mean.stride(0) if running else 1, bn.running_var.stride(0) if running else 1, float(M),
            float(bn.eps), 0.0 if bn.momentum is None else float(bn.momentum), int(running), int(nbt is not None),
            int(bn.momentum is None and nbt is not None))


def _finalize_ptrs(bn: Optional[BNTrain], K: int, x: Tensor) -> tuple:
    """The kernel's BN pointer arguments, in its order (dummies without `bn`)."""
    if bn is None:
        ptrs = _NO_FINALIZE.get(x.device)
        if ptrs is None:
            ptrs = (dummy(x.device),) * 6 + (dummy(x.device, torch.int64),)
            if not capturing(x.device):  # (a miss while a graph captures gets the graph's own dummies)
                _NO_FINALIZE[x.device] = ptrs
        return ptrs
    unused = dummy(x.device)
    running = bn.running_mean is not None
    nbt = bn.num_batches_tracked
    weight, bias = affine_pair(bn.weight, bn.bias, K, x)
    return (weight, bias, bn.scale, bn.shift, bn.running_mean if running else unused,
            bn.running_var if running else unused, dummy(x.device, torch.int64) if nbt is None else nbt)


_NO_FINALIZE: dict = {}  # device -> _finalize_ptrs(None, ...): the dummies, made once per device (like dummy())


def _bn_key(bn: Optional[BNTrain]) -> Optional[tuple]:
    if bn is None:
        return None
    return (tensor_key(bn.weight), tensor_key(bn.bias), bn.eps, tensor_key(bn.running_mean),
            tensor_key(bn.running_var), tensor_key(bn.num_batches_tracked), bn.momentum, tensor_key(bn.scale),
            tensor_key(bn.shift))


@dataclass(frozen=True)
class _FwdPlan:
    """conv_fwd's launch from its arguments' metadata (LaunchPlans): everything but the tensors."""
    geo: ConvGeometry
    M: int
    y_dtype: torch.dtype
    prologue: bool
    epilogue: bool
    compute_stats: bool
    part_shape: tuple  # the statistics' per-slot partials, then the chunks' level-2 slots
    n_sems: int  # counters: the column blocks', FINALIZE's num_batches_tracked one, the chunks'
    grid: Callable
    scalars: tuple  # every integer / float argument, in the kernel's order
    meta: dict  # constexprs
    tiles_m: Optional[dict]
    store_xp: bool = False  # STORE_XP: the launch stores x' (stores_x_prime)


_FWD_PLANS = LaunchPlans("conv_fwd")


def _plan_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
              in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
              residual: Optional[Tensor], out_relu: bool, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, compute_stats: bool, out_dtype: Optional[torch.dtype],
              tiles: Optional[dict], finalize: Optional[BNTrain], x_prime: bool = False) -> _FwdPlan:
    """conv_fwd's checks (ValueError/TypeError naming the values) and launch configuration; `x_prime`: store x'
    where stores_x_prime allows it."""
    if finalize is not None and not compute_stats:
        raise ValueError("conv_fwd: finalize needs compute_stats=True (the BatchNorm finalizes the statistics)")
    geo = conv_geometry(x, weight, stride, padding, dilation, groups)
    check_vector("bias", bias, geo.K)
    check_vector("in_scale", in_scale, geo.C)
    check_vector("in_shift", in_shift, geo.C)
    check_vector("out_scale", out_scale, geo.K)
    check_vector("out_shift", out_shift, geo.K)
    if residual is not None:
        check_4d("residual", residual)
        check_shape("residual", residual, (geo.N, geo.K, geo.P, geo.Q))
    check_same_device(x.device, bias=bias, in_scale=in_scale, in_shift=in_shift, out_scale=out_scale,
                      out_shift=out_shift, residual=residual)

    M = geo.N * geo.P * geo.Q
    bn_scalars = _finalize_scalars(finalize, geo.K, M, x)
    meta = fwd_tiles(geo, has_prologue(in_scale, in_shift, in_relu), bool(compute_stats))
    tile_m = None
    if tiles is not None:
        unknown = sorted(set(tiles) - set(FWD_TILE_KEYS))
        if unknown:   # (on a GPU Triton rejects an unknown keyword, the interpreter ignores it)
            raise ValueError(f"triton conv_fused: tiles {unknown} are not the forward's; it takes {FWD_TILE_KEYS} "
                             "(forward_tiles() keeps those of a backward's tiles)")
        meta.update({k: v for k, v in tiles.items() if k != "BLOCK_M"})
        tile_m = tiles.get("BLOCK_M")
    if tile_m is None and INTERPRET:
        tile_m = _INTERPRET_BLOCK_M
    tiles_m = {"BLOCK_M": tile_m} if tile_m is not None else None
    part_m = part_rows(FWD_CONFIGS, tiles_m, _INTERPRET_BLOCK_M)
    prologue = has_prologue(in_scale, in_shift, in_relu)
    store_xp = bool(x_prime) and stores_x_prime(geo, meta, prologue)
    epilogue = out_scale is not None or out_shift is not None
    # a prologue on 2-byte operands: x' the MMA's B operand (TRANS_ACC), one group a program (two would make each
    # product's M a group's 32 columns: mma.sync, not wgmma; without TRANS_ACC, two groups' register-operand wgmma
    # took longer, 176 -> 185 us modelled for the 32-channel 3x3 training forward). The statistics of a forward
    # without a prologue too, where its groups are not packed: acc^T puts a column's rows in the MMA's N, inside a
    # warp, so the per-tile sums need no shared memory (a 128-channel 3x3 training forward's epilogue: 2806 -> 1835
    # SASS a program, 132 -> 2 shared stores, 255 -> 177 registers; Triton 3.6)
    packed = pack_groups(geo.groups, geo.K_g, geo.C_g, meta["BLOCK_N"], meta["BLOCK_K"])
    trans_acc = (prologue or (bool(compute_stats) and packed == 1)) and x.dtype != torch.float32
    pack = 1 if trans_acc else packed
    # grid axis 1 (the configs vary BLOCK_M, warps): column blocks of PACK groups each
    n_cols = geo.groups // pack * cdiv(geo.K_g * pack, meta["BLOCK_N"])
    y_shape = (geo.N, geo.K, geo.P, geo.Q)
    y_strides = channels_last_strides(y_shape)
    w_strides = krsc_strides(weight)
    scalars = (geo.H, geo.W, geo.K, geo.P, geo.Q, M, geo.C_g, geo.K_g, geo.S, geo.R * geo.S * geo.C_g,
               next_pow2(max(M, 1)), *divisor_magic(geo.C_g), *divisor_magic(geo.S),
               *strides4(x), *w_strides, *strides4(residual), *y_strides,
               *geo.stride, *geo.padding, *geo.dilation, *bn_scalars, geo.C)
    meta.update(HAS_BIAS=bias is not None, PROLOGUE=prologue, IN_RELU=bool(in_relu), EPILOGUE=epilogue,
                HAS_RES=residual is not None, OUT_RELU=bool(out_relu), STATS=bool(compute_stats),
                FINALIZE=finalize is not None,
                UPCAST=upcast_bf16(x.dtype), PRECISION=dot_precision(x.dtype),
                TAP_STEPS=tap_steps(geo.C_g, meta["BLOCK_K"]),
                # (the per-element split keeps its column mask: without it the stem's 4-warp config spilled 4 bytes)
                EVEN_N=(geo.K_g * pack) % meta["BLOCK_N"] == 0 and tap_steps(geo.C_g, meta["BLOCK_K"]),
                # (fp32: TF32 operands took longer transposed: 811 -> 923 us modelled, a 3x3 training forward)
                TRANS_ACC=trans_acc,
                PRO_ONCE=prologue and tap_steps(geo.C_g, meta["BLOCK_K"]) and geo.C_g == meta["BLOCK_K"], PACK=pack,
                FAST_DIV_J=geo.C_g % 16 != 0, STORE_XP=store_xp,
                PART_M=part_m,
                BLOCK_S=MERGE_SLOTS, CHUNK=CHUNK_SLOTS)
    slots = cdiv(M, part_m)
    return _FwdPlan(geo, M, out_dtype or x.dtype, prologue, epilogue, bool(compute_stats),
                    (slots + slot_chunks(slots), 3, geo.K), chunk_counters(n_cols, slot_chunks(slots)),
                    lambda m: (cdiv(M, m["BLOCK_M"]), n_cols), scalars, meta, tiles_m, store_xp)


FWD_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")   # a caller's tile overrides the forward takes


def forward_tiles(tiles: Optional[dict]) -> Optional[dict]:
    """The forward's part of a backward's tile overrides (a test's; SPLIT, TRANS_ACC, ... are the backward's own)."""
    return None if tiles is None else {k: v for k, v in tiles.items() if k in FWD_TILE_KEYS}


def conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
             in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor], out_shift: Optional[Tensor],
             residual: Optional[Tensor], out_relu: bool, stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], groups: int, compute_stats: bool, out_dtype: Optional[torch.dtype] = None,
             tiles: Optional[dict] = None, partials: Optional[Tensor] = None, *,
             finalize: Optional[BNTrain] = None) -> tuple[Tensor, Tensor]:
    """Launcher of the fused forward: one launch (none for an empty batch). Returns (y channels_last in `out_dtype`
    (default x.dtype), stats).

    `tiles` overrides the tile sizes (keys BLOCK_M, BLOCK_N, BLOCK_K; a test uses it to exercise the masks).
    With out_dtype=float32 and no epilogue arguments, y is the fp32 accumulator `acc` (used by the backward).
    `partials` (tests): a (cdiv(N*P*Q, PART_M), 3, K) fp32 contiguous buffer that receives the per-slot
    [count, mean, M2] the stats are merged from (else one is allocated); PART_M is BLOCK_M with `tiles`.
    `finalize` (with compute_stats): also bn_train_finalize(stats, N*P*Q, ...) in the same launch (FINALIZE), into
    finalize.scale / finalize.shift, running statistics and num_batches_tracked updated in place (conv_bn_train).
    The checks and the launch configuration are memoised on the arguments' metadata (_plan_fwd, LaunchPlans).
    """
    args = (x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu, stride, padding,
            dilation, groups, compute_stats, out_dtype, tiles, finalize)
    if tiles is not None or not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        plan = _plan_fwd(*args)  # (a test's tiles; a non-tensor gets its TypeError)
    else:
        key = (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(in_scale), tensor_key(in_shift),
               bool(in_relu), tensor_key(out_scale), tensor_key(out_shift), tensor_key(residual), bool(out_relu),
               tuple(stride), tuple(padding), tuple(dilation), groups, bool(compute_stats), out_dtype,
               _bn_key(finalize), dot_precision(x.dtype))
        plan = _FWD_PLANS.get(key) or _FWD_PLANS.put(key, _plan_fwd(*args))
    return _run_fwd(plan, x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, finalize, partials)[:2]


def _run_fwd(plan: _FwdPlan, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
             in_shift: Optional[Tensor], out_scale: Optional[Tensor], out_shift: Optional[Tensor],
             residual: Optional[Tensor], finalize: Optional[BNTrain], partials: Optional[Tensor]):
    geo, M, device = plan.geo, plan.M, x.device
    unused = dummy(device)
    y = empty_channels_last((geo.N, geo.K, geo.P, geo.Q), plan.y_dtype, device)
    in_scale, in_shift = affine_pair(in_scale, in_shift, geo.C, x) if plan.prologue else (unused, unused)
    out_scale, out_shift = affine_pair(out_scale, out_shift, geo.K, x) if plan.epilogue else (unused, unused)
    part = stats = unused
    sems = dummy(device, torch.int32)
    if plan.compute_stats and M == 0:  # no program runs: the statistics of nothing (a merge of no slot)
        stats = torch.zeros((2, geo.K), dtype=torch.float32, device=device)
    elif plan.compute_stats:
        # Every slot is written by every config (store_part): no zeroing, nothing stale between autotune trials.
        part = torch.empty(*plan.part_shape, dtype=torch.float32, device=device) if partials is None else partials
        if partials is not None and (tuple(part.shape) != plan.part_shape or part.dtype != torch.float32
                                     or not part.is_contiguous() or part.device != device):
            raise ValueError(f"partials must be a contiguous fp32 tensor of shape {plan.part_shape} on {device}, "
                             f"got {part.dtype} {tuple(part.shape)} on {part.device}")
        stats = torch.empty(2, geo.K, dtype=torch.float32, device=device)  # every element written
        sems = stream_counters(plan.n_sems, device)  # chunk_counters: [n_cols] is FINALIZE's nbt counter
    weight, _ = krsc(weight)
    x_prime = empty_channels_last(tuple(x.shape), x.dtype, device) if plan.store_xp else None
    args = (x, weight, unused if bias is None else bias, in_scale, in_shift, out_scale, out_shift,
            x if residual is None else residual, y, part, stats, sems, *_finalize_ptrs(finalize, geo.K, x),
            unused if x_prime is None else x_prime, *plan.scalars)
    if M > 0:  # an empty batch launches nothing
        launch(_conv_fwd_kernel, _conv_fwd_kernel_tuned, plan.grid, args, plan.meta, plan.tiles_m)
    if not plan.compute_stats:
        stats = torch.empty(0, dtype=torch.float32, device=device)
    return y, stats, x_prime


def conv_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor],
               out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
               compute_stats: bool) -> tuple[Tensor, Tensor]:
    """Triton implementation of pe_kernels.reference.conv_fused (same arguments, same results)."""
    return conv_fwd(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu,
                    stride, padding, dilation, groups, compute_stats)


def conv_fused_keyed(op_key: tuple, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                     in_shift: Optional[Tensor], in_relu: bool, out_scale: Optional[Tensor],
                     out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     compute_stats: bool) -> tuple[Tensor, Tensor]:
    """conv_fused with its launch plan keyed on `op_key`, the op's key of these arguments (ops/conv_fused: the
    metadata key its checks were memoised under, the autocast dtype and the ReLU flags, which together fix every
    argument's metadata), instead of a key of its own: the same plan, the same launch, one key less per call."""
    key = ("op", op_key, dot_precision(x.dtype))
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _FWD_PLANS.put(key, _plan_fwd(x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                                             residual, out_relu, stride, padding, dilation, groups, compute_stats,
                                             None, None, None))
    return _run_fwd(plan, x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, None, None)[:2]


def conv_bn_train(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                  tiles: Optional[dict] = None, *, x_prime: bool = False) -> tuple:
    """Triton implementation of pe_kernels.reference.conv_bn_train: (y, stats, scale, shift), the results of
    conv_fused(..., compute_stats=True) then bn_train_finalize(stats, N*P*Q, ...), in ONE launch (conv_fwd with
    `finalize`: the programs that merge a column block's statistics also finalize those channels; the last of
    them bumps num_batches_tracked). On a GPU the launch is autotuned like conv_fused's; the autotuner's trials
    leave the running statistics and num_batches_tracked as they found them (restore_value), so only the real run
    updates them. An empty batch raises ValueError (the caller never sends one); count N*P*Q < 2 with running
    statistics raises it too, after the num_batches_tracked bump, as bn_train_finalize. `tiles`: conv_fwd's.
    `x_prime` (X_PRIME): a fifth result, x' = act(x * in_scale + in_shift) in x's dtype, channels_last, as the
    launch formed it, where stores_x_prime allows (else None): conv_bn_train_backward(x_prime=...) reads it."""
    return _conv_bn_train(None, x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
                          bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum, tiles,
                          x_prime)


def conv_bn_train_keyed(op_key: tuple, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                        in_shift: Optional[Tensor], in_relu: bool, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], groups: int, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                        eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        num_batches_tracked: Optional[Tensor], momentum: Optional[float], *,
                        x_prime: bool = False) -> tuple:
    """conv_bn_train with its launch plan keyed on `op_key`, the op's key of these arguments (ops/conv_bn_train:
    what fixes every argument's metadata and scalar), instead of a key of its own (conv_fused_keyed)."""
    return _conv_bn_train(op_key, x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
                          bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum, None,
                          x_prime)


def _conv_bn_train(op_key, x, weight, bias, in_scale, in_shift, in_relu, stride, padding, dilation, groups, bn_weight,
                   bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum, tiles, x_prime=False):
    check_4d("x", x)
    check_4d("weight", weight)
    K = weight.shape[0]
    scale = torch.empty(K, dtype=torch.float32, device=x.device)  # every element written by the launch
    shift = torch.empty(K, dtype=torch.float32, device=x.device)
    bn = BNTrain(bn_weight, bn_bias, eps, running_mean, running_var, num_batches_tracked, momentum, scale, shift)
    x_prime = bool(x_prime)
    args = (x, weight, bias, in_scale, in_shift, in_relu, None, None, None, False, stride, padding, dilation, groups,
            True, None, tiles, bn, x_prime)
    if tiles is not None:
        plan = _plan_fwd(*args)
    else:  # the op's key, or conv_fwd's without what this launcher fixes (no epilogue; scale and shift made above)
        if op_key is not None:
            key = ("op", op_key, dot_precision(x.dtype), x_prime)
        else:
            key = (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(in_scale), tensor_key(in_shift),
                   bool(in_relu), tuple(stride), tuple(padding), tuple(dilation), groups, tensor_key(bn_weight),
                   tensor_key(bn_bias), eps, tensor_key(running_mean), tensor_key(running_var),
                   tensor_key(num_batches_tracked), momentum, dot_precision(x.dtype), x_prime)
        plan = _TRAIN_PLANS.get(key) or _TRAIN_PLANS.put(key, _plan_fwd(*args))
    y, stats, xp = _run_fwd(plan, x, weight, bias, in_scale, in_shift, None, None, None, bn, None)
    return (y, stats, scale, shift, xp) if x_prime else (y, stats, scale, shift)


_TRAIN_PLANS = LaunchPlans("conv_bn_train")
