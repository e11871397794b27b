"""BatchNorm apply (+ the residual-block tail) and its backward, each in one pass over NHWC tiles.

Math (pe_kernels.reference.bn_apply / bn_apply_backward)::

    out = act(y * scale[k] + shift[k] + residual * residual_scale[k] + residual_shift[k])

    g = where(out <= 0, 0, grad_out)  (if relu; torch's ReLU backward: a NaN out passes the gradient)
    dy = g * scale,  d_scale = sum g * y,  d_shift = sum g
    d_residual = g * residual_scale,  d_residual_scale = sum g * residual,  d_residual_shift = sum g

The scale sums are formed centred on each tile's mean (sum_centred): sum g (y - m_t) + m_t sum g, so that the BN
weight gradient, sum g*y - mean * sum g, keeps the accuracy of stock BatchNorm's sum g (y - mean).

Sums run over (n, h, w). The backward reads grad_out, out, y and residual once and writes dy, d_residual and
per-slot fp32 partials (slots, 3, K) [sum g*y, sum g, sum g*residual]; in the same launch the last M tile of each
column block to arrive at its counter (_common.last_arrival, counters from _common.stream_counters, reset by that
program) sums its columns' slots in slot order (deterministic, no atomics on values) into the needed sums, each a
tensor of its own; every slot is written (store_part), so the buffer needs no zeroing. Launches: the apply, one
kernel; its backward, one; no other device work.
Grid: (tiles of M = N*H*W, tiles of K). Any input strides; outputs channels_last.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, REDUCE_SLOTS, LaunchPlans, Tensor, affine_pair, cdiv, check_4d, check_activation_dtype,
                      check_same_device, check_shape, check_vector, dummy, empty_channels_last, last_arrival,
                      nhwc_tile, pow2_tile, store_part, stream_counters, strides4, sum_slots, tensor_key,
                      tile_offsets)


# Spatial sizes do not help code generation: not specialised on (strides and K are).
_NOT_SPECIALIZED = ["H", "W", "M"]


@triton.jit
def sum_centred(g, v, mask):
    """Per column, sum over the tile's rows of g * v, formed as sum g (v - m) + m sum g, m = the tile's mean of v
    over the `mask`ed elements (0 where it is not finite; then it is the plain sum). A scale gradient sum g*y
    reaches the BatchNorm weight as sum g*y - mean * sum g (bn_finalize backward): formed plainly, the fp32
    rounding of sum g*y (n u |mean| sum |g|) survives that cancellation and is multiplied by invstd (1/sqrt(eps)
    at a constant channel); centred, what survives is one rounding of m * sum g per tile, as in the two-pass
    sum g (y - mean) of stock BatchNorm."""
    cnt = tl.sum(mask.to(tl.float32), axis=0)
    m = tl.sum(tl.where(mask, v, 0.0), axis=0) / tl.maximum(cnt, 1.0)
    m = tl.where(tl.abs(m) < 3.0e38, m, 0.0)   # NaN and inf fail the test: no centring
    gm = tl.where(mask, g, 0.0)
    s1 = tl.sum(gm * (v - m[None, :]), axis=0)
    return s1 + tl.where(m == 0.0, 0.0, m * tl.sum(gm, axis=0))


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _bn_apply_kernel(
    y_ptr,          # input (N, K, H, W), any strides
    scale_ptr,      # (K,) contiguous
    shift_ptr,      # (K,) contiguous
    res_ptr,        # residual (N, K, H, W), any strides, or unused
    rscale_ptr,     # (K,) residual_scale, contiguous, or unused
    rshift_ptr,     # (K,) residual_shift, contiguous, or unused
    out_ptr,        # out: (N, K, H, W), any strides
    K, H, W, M,                  # channels, height, width, M = N*H*W
    syn, syc, syh, syw,          # y strides
    srn, src, srh, srw,          # residual strides
    son, soc, soh, sow,          # out strides
    HAS_RES: tl.constexpr,
    RES_AFFINE: tl.constexpr,    # residual * residual_scale + residual_shift (an absent one passed as identity)
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_k, mask_m, mask_k, n, h, w, k = nhwc_tile(tl.program_id(0), tl.program_id(1), M, K, H, W,
                                                           BLOCK_M, BLOCK_K)
    mask = mask_m[:, None] & mask_k[None, :]

    yv = tl.load(y_ptr + tile_offsets(n, h, w, k, syn, syc, syh, syw), mask=mask, other=0.0)
    z = (yv.to(tl.float32) * tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
         + tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)[None, :])
    if HAS_RES:
        r = tl.load(res_ptr + tile_offsets(n, h, w, k, srn, src, srh, srw), mask=mask, other=0.0)
        r = r.to(tl.float32)
        if RES_AFFINE:
            r = (r * tl.load(rscale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
                 + tl.load(rshift_ptr + offs_k, mask=mask_k, other=0.0)[None, :])
        z = z + r
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + tile_offsets(n, h, w, k, son, soc, soh, sow),
             z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _bn_apply_bwd_kernel(
    go_ptr,         # grad_out (N, K, H, W), any strides
    out_ptr,        # forward output (ReLU mask), any strides, or unused
    y_ptr,          # forward input y, any strides (read when d_scale is needed)
    res_ptr,        # residual, any strides, or unused
    scale_ptr,      # (K,) contiguous
    rscale_ptr,     # (K,) residual_scale, contiguous, or unused
    dy_ptr,         # out: dy, any strides, or unused
    dres_ptr,       # out: d_residual, any strides, or unused
    part_ptr,       # out: (cdiv(M, PART_M), 3, K) fp32 [sum g*y, sum g, sum g*residual], all written
    dscale_ptr,     # out: (K,) fp32 d_scale = sum g*y (SUM_GY), or unused
    dshift_ptr,     # out: (K,) fp32 d_shift = sum g (SUM_G), or unused
    drscale_ptr,    # out: (K,) fp32 d_residual_scale = sum g*residual (SUM_GR), or unused
    drshift_ptr,    # out: (K,) fp32 d_residual_shift = sum g (SUM_G_RES), or unused
    sem_ptr,        # (column blocks,) int32 counters, 0 at launch, left at 0 (SUMS), or unused
    K, H, W, M,                  # channels, height, width, M = N*H*W
    sgn, sgc, sgh, sgw,          # grad_out strides
    son, soc, soh, sow,          # out strides
    syn, syc, syh, syw,          # y strides
    srn, src, srh, srw,          # residual strides
    sdn, sdc, sdh, sdw,          # dy strides
    sen, sec, seh, sew,          # d_residual strides
    RELU: tl.constexpr, HAS_RSCALE: tl.constexpr,
    STORE_DY: tl.constexpr, SUM_GY: tl.constexpr, STORE_DRES: tl.constexpr, SUM_GR: tl.constexpr,
    SUM_G: tl.constexpr, SUM_G_RES: tl.constexpr,   # write d_shift / d_residual_shift
    SUMS: tl.constexpr,          # any of the four sums: the last program of each column block reduces the slots
    PART_M: tl.constexpr,        # rows per partial-sum slot (BLOCK_M is a multiple of it)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,       # slots per step of the reduction (REDUCE_SLOTS)
):
    pid_m = tl.program_id(0)
    offs_m, offs_k, mask_m, mask_k, n, h, w, k = nhwc_tile(pid_m, tl.program_id(1), M, K, H, W, BLOCK_M, BLOCK_K)
    mask = mask_m[:, None] & mask_k[None, :]

    g = tl.load(go_ptr + tile_offsets(n, h, w, k, sgn, sgc, sgh, sgw), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + tile_offsets(n, h, w, k, son, soc, soh, sow), mask=mask, other=0.0)
        g = tl.where(o <= 0, 0.0, g)
    # Every slot of the three sums is written (zeros where unused): the buffer needs no zeroing.
    zero = tl.zeros((BLOCK_K,), dtype=tl.float32)
    store_part(part_ptr + K, pid_m, M, 3 * K, offs_k, mask_k, tl.sum(g, axis=0), PART_M, BLOCK_M)
    if STORE_DY:
        dy = g * tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        tl.store(dy_ptr + tile_offsets(n, h, w, k, sdn, sdc, sdh, sdw),
                 dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if SUM_GY:
        yv = tl.load(y_ptr + tile_offsets(n, h, w, k, syn, syc, syh, syw), mask=mask, other=0.0)
        store_part(part_ptr, pid_m, M, 3 * K, offs_k, mask_k, sum_centred(g, yv.to(tl.float32), mask), PART_M,
                   BLOCK_M)
    else:
        store_part(part_ptr, pid_m, M, 3 * K, offs_k, mask_k, zero, PART_M, BLOCK_M)
    if STORE_DRES:
        dr = g
        if HAS_RSCALE:
            dr = g * tl.load(rscale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        tl.store(dres_ptr + tile_offsets(n, h, w, k, sen, sec, seh, sew),
                 dr.to(dres_ptr.dtype.element_ty), mask=mask)
    if SUM_GR:
        rv = tl.load(res_ptr + tile_offsets(n, h, w, k, srn, src, srh, srw), mask=mask, other=0.0)
        store_part(part_ptr + 2 * K, pid_m, M, 3 * K, offs_k, mask_k, sum_centred(g, rv.to(tl.float32), mask),
                   PART_M, BLOCK_M)
    else:
        store_part(part_ptr + 2 * K, pid_m, M, 3 * K, offs_k, mask_k, zero, PART_M, BLOCK_M)
    if SUMS:
        _sums_if_last(part_ptr, dscale_ptr, dshift_ptr, drscale_ptr, drshift_ptr, sem_ptr, K, M, SUM_GY, SUM_G,
                      SUM_GR, SUM_G_RES, PART_M, BLOCK_S, BLOCK_K)


@triton.jit(noinline=True)
def _sums_if_last(part_ptr, dscale_ptr, dshift_ptr, drscale_ptr, drshift_ptr, sem_ptr, K, M, SUM_GY: tl.constexpr,
                  SUM_G: tl.constexpr, SUM_GR: tl.constexpr, SUM_G_RES: tl.constexpr, PART_M: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """In the last M tile of this column block to arrive: d_scale, d_shift, d_residual_scale, d_residual_shift of
    its columns from the (cdiv(M, PART_M), 3, K) partials (those asked for), then the counter reset to 0."""
    pid_k = tl.program_id(1)
    if last_arrival(sem_ptr + pid_k, tl.num_programs(0)):
        offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = offs < K
        n_slots = tl.cdiv(M, PART_M)
        if SUM_GY:
            total = sum_slots(part_ptr, n_slots, 3 * K, offs, mask, BLOCK_S, BLOCK_K)
            tl.store(dscale_ptr + offs, total, mask=mask)
        if SUM_G or SUM_G_RES:
            total = sum_slots(part_ptr + K, n_slots, 3 * K, offs, mask, BLOCK_S, BLOCK_K)
            if SUM_G:
                tl.store(dshift_ptr + offs, total, mask=mask)
            if SUM_G_RES:
                tl.store(drshift_ptr + offs, total, mask=mask)
        if SUM_GR:
            total = sum_slots(part_ptr + 2 * K, n_slots, 3 * K, offs, mask, BLOCK_S, BLOCK_K)
            tl.store(drscale_ptr + offs, total, mask=mask)
        tl.store(sem_ptr + pid_k, 0)


def _tiles(K: int, tiles: Optional[dict]) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K): all channels of a row in one tile where they fit (few programs under the
    interpreter; contiguous NHWC rows on a GPU)."""
    tiles = tiles or {}
    block_k = tiles.get("BLOCK_K") or pow2_tile(K, 16, 256 if INTERPRET else 128)
    block_m = tiles.get("BLOCK_M") or max(16, (8192 if INTERPRET else 4096) // block_k)
    return block_m, block_k


def _check_apply_args(y, scale, shift, residual, residual_scale, residual_shift):
    check_4d("y", y)
    check_activation_dtype("y", y)
    N, K, H, W = y.shape
    if N * H * W >= 2**31:
        raise ValueError(f"N*H*W = {N * H * W} must stay below 2**31 (row indices are 32-bit)")
    if scale is None or shift is None:
        raise ValueError("bn_apply needs both scale and shift (K,) vectors")
    check_vector("scale", scale, K)
    check_vector("shift", shift, K)
    check_vector("residual_scale", residual_scale, K)
    check_vector("residual_shift", residual_shift, K)
    if residual is not None:
        check_4d("residual", residual)
        check_shape("residual", residual, y.shape)
    check_same_device(y.device, scale=scale, shift=shift, residual=residual, residual_scale=residual_scale,
                      residual_shift=residual_shift)


def _check_apply_bwd_args(grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out, n_needs):
    _check_apply_args(y, scale, shift, residual, residual_scale, residual_shift)
    check_4d("grad_out", grad_out)
    check_shape("grad_out", grad_out, y.shape)
    if relu:
        check_4d("out", out)
        check_shape("out", out, y.shape)
    check_same_device(y.device, grad_out=grad_out, out=out)
    if n_needs != 6:
        raise ValueError(f"needs_grad must have 6 entries (APPLY_GRAD_NAMES), got {n_needs}")
    return True


_APPLY_CHECKS = LaunchPlans("bn_apply")
_APPLY_BWD_CHECKS = LaunchPlans("bn_apply_bwd")


def _checked(memo: LaunchPlans, tiles: Optional[dict], check, *args) -> None:
    """check(*args) (it raises, or returns a truthy value), once per metadata of `args` (tensor_key; the bools and
    ints as they are); every time with a test's `tiles` or an argument of another type (its TypeError)."""
    if tiles is not None or not all(a is None or isinstance(a, (Tensor, bool, int)) for a in args):
        check(*args)
        return
    key = tuple(tensor_key(a) if a is None or isinstance(a, Tensor) else a for a in args)
    if memo.get(key) is None:
        memo.put(key, check(*args) or True)


def _vec32(t: Tensor) -> Tensor:
    """A per-channel vector as contiguous fp32: the vector itself (no copy, no launch) when it already is."""
    return t.to(torch.float32).contiguous()


def bn_apply_fwd(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool,
                 tiles: Optional[dict] = None) -> Tensor:
    """Launcher of bn_apply; `tiles` overrides BLOCK_M / BLOCK_K. Its checks are memoised on the arguments'
    metadata (LaunchPlans)."""
    _checked(_APPLY_CHECKS, tiles, _check_apply_args, y, scale, shift, residual, residual_scale, residual_shift)
    N, K, H, W = y.shape
    M = N * H * W
    out = empty_channels_last(y.shape, y.dtype, y.device)
    block_m, block_k = _tiles(K, tiles)
    has_res = residual is not None
    if M * K == 0:
        return out
    unused = dummy(y.device)
    res_affine = has_res and (residual_scale is not None or residual_shift is not None)
    rscale, rshift = (_vec32(t) for t in affine_pair(residual_scale, residual_shift, K, y)) if res_affine else (
        unused, unused)
    _bn_apply_kernel[(cdiv(M, block_m), cdiv(K, block_k))](
        y, _vec32(scale), _vec32(shift), residual if has_res else y, rscale, rshift, out,
        K, H, W, M, *strides4(y), *strides4(residual), *strides4(out),
        HAS_RES=has_res, RES_AFFINE=res_affine, RELU=bool(relu), BLOCK_M=block_m, BLOCK_K=block_k)
    return out


def bn_apply_bwd(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool, out: Tensor,
                 needs_grad: Sequence[bool], tiles: Optional[dict] = None) -> list[Optional[Tensor]]:
    """Launcher of bn_apply_backward; `tiles` overrides BLOCK_M / BLOCK_K. Its checks are memoised on the
    arguments' metadata (LaunchPlans)."""
    needs_grad = [bool(v) for v in needs_grad]
    _checked(_APPLY_BWD_CHECKS, tiles, _check_apply_bwd_args, grad_out, y, scale, shift, residual, residual_scale,
             residual_shift, bool(relu), out if relu else None, len(needs_grad))
    need_y, need_scale, need_shift, need_res, need_rscale, need_rshift = needs_grad
    has_res = residual is not None
    need_res = need_res and has_res
    need_rscale = need_rscale and has_res and residual_scale is not None
    need_rshift = need_rshift and has_res and residual_shift is not None
    result: list[Optional[Tensor]] = [None] * 6
    if not (need_y or need_scale or need_shift or need_res or need_rscale or need_rshift):
        return result

    N, K, H, W = y.shape
    M = N * H * W
    block_m, block_k = _tiles(K, tiles)
    dy = empty_channels_last(y.shape, y.dtype, y.device) if need_y else None
    dres = empty_channels_last(residual.shape, residual.dtype, y.device) if need_res else None
    # Slots of PART_M = block_m rows, all written by any BLOCK_M multiple of it (store_part).
    part = torch.empty((cdiv(M, block_m), 3, K), dtype=torch.float32, device=y.device)
    unused = dummy(y.device)
    # d_scale, d_shift, d_residual_scale, d_residual_shift (= sum g again, a tensor of its own), summed in the
    # kernel; zeros for an empty input (no program runs)
    sums = (need_scale, need_shift, need_rscale, need_rshift)
    make = torch.zeros if M == 0 else torch.empty
    for index, flag in zip((1, 2, 4, 5), sums):
        if flag:
            result[index] = make(K, dtype=torch.float32, device=y.device)
    n_cols = cdiv(K, block_k)
    sems = stream_counters(n_cols, y.device) if any(sums) else dummy(y.device, torch.int32)
    if M * K > 0:  # an empty input launches nothing
        _bn_apply_bwd_kernel[(cdiv(M, block_m), n_cols)](
            grad_out, out if relu else grad_out, y, residual if has_res else y, _vec32(scale),
            _vec32(residual_scale) if has_res and residual_scale is not None else unused,
            dy if need_y else y, dres if need_res else y, part,
            *(unused if result[index] is None else result[index] for index in (1, 2, 4, 5)), sems,
            K, H, W, M, *strides4(grad_out), *strides4(out if relu else None), *strides4(y), *strides4(residual),
            *strides4(dy), *strides4(dres),
            RELU=bool(relu), HAS_RSCALE=has_res and residual_scale is not None, STORE_DY=need_y,
            SUM_GY=need_scale, STORE_DRES=need_res, SUM_GR=need_rscale, SUM_G=need_shift, SUM_G_RES=need_rshift,
            SUMS=any(sums), PART_M=block_m, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_S=REDUCE_SLOTS)
    result[0] = dy
    result[3] = dres
    return result


def bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    """Triton implementation of pe_kernels.reference.bn_apply."""
    return bn_apply_fwd(y, scale, shift, residual, residual_scale, residual_shift, relu)


def bn_apply_backward(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                      residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool,
                      out: Tensor, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Triton implementation of pe_kernels.reference.bn_apply_backward (APPLY_GRAD_NAMES order)."""
    return bn_apply_bwd(grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out,
                        needs_grad)
