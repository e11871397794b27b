"""BatchNorm apply (+ the residual-block tail) and its backward, each in one pass over NHWC tiles.

Math (pe_kernels.reference.bn_apply / bn_apply_backward)::

    out = act(y * scale[k] + shift[k] + residual * residual_scale[k] + residual_shift[k])

    g = where(out <= 0, 0, grad_out)  (if relu; torch's ReLU backward: a NaN out passes the gradient)
    dy = g * scale,  d_scale = sum g * y,  d_shift = sum g
    d_residual = g * residual_scale,  d_residual_scale = sum g * residual,  d_residual_shift = sum g

The scale sums are formed centred on the channel's first value (y0 of y, r0 of the residual: row 0; 0 where it is
not finite), as reference.sum_centred: sum g (y - y0) + y0 sum g, so that the BN weight gradient,
sum g*y - mean * sum g, keeps the accuracy of stock BatchNorm's sum g (y - mean). (sum_centred below, centred on a
tile's mean, serves the conv backward's epilogue kernel: d_out_scale.)

Sums run over (n, h, w). The backward reads grad_out, out, y and residual once and writes dy and d_residual. Each of
its programs loops over ROWS rows of one column block (bwd_tiles: ~1024 programs on a GPU), every load of a step
before any store, the sums accumulated element-wise in registers and summed across rows once a program, into one
fp32 slot of (programs, 3, K) [sum g (y - y0), sum g, sum g (r - r0)]; in the same launch the slots are summed in two
levels (_common.sum_chunks_if_last): the last program of each chunk of CHUNK_SLOTS slots to arrive at its counter
(_common.last_arrival, counters from _common.stream_counters, reset by their last programs) sums the chunk, the last
chunk of each column block sums the chunks' totals, in fixed orders (deterministic, no atomics on values), into the
needed sums, each a tensor of its own; every slot read is written, so the buffer needs no zeroing. Where every tensor
is channels_last (FLAT) a program addresses its rows as m * K + k from its first row: no (n, h, w) from m. Launches:
the apply, one kernel; its backward, one; no other device work.
Grid: (tiles of M = N*H*W, tiles of K) for the apply, (programs of ROWS rows, tiles of K) for its backward. Any input
strides; outputs channels_last.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import (CHUNK_SLOTS, INTERPRET, REDUCE_SLOTS, LaunchPlans, Tensor, affine_pair, cdiv,
                      channels_last_strides, check_4d, check_activation_dtype, check_same_device, check_shape,
                      check_vector, chunk_counters, dense_rows, dummy, empty_channels_last, nhwc_tile, pow2_tile,
                      slot_chunk, slot_chunks, stream_counters, strides4, sum_chunks_if_last, tensor_key,
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
    bits_ptr,       # out (RELU_BITS): (M, n_words) int32, bit k % 32 of word k // 32 of row m = n*H*W + h*W + w set
                    # where out is not <= 0 (the ReLU's backward mask: torch's threshold_backward), or unused
    K, H, W, M,                  # channels, height, width, M = N*H*W
    n_words,                     # cdiv(K, 32) (RELU_BITS)
    syn, syc, syh, syw,          # y strides
    srn, src, srh, srw,          # residual strides
    son, soc, soh, sow,          # out strides
    HAS_RES: tl.constexpr,
    RES_AFFINE: tl.constexpr,    # residual * residual_scale + residual_shift (an absent one passed as identity)
    RELU: tl.constexpr,
    RELU_BITS: tl.constexpr,     # also store the ReLU mask, one bit an element (a tile's channels start at a multiple
                                 # of 32 or are all of them: BLOCK_K >= 32 or BLOCK_K >= K)
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
    zs = z.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tile_offsets(n, h, w, k, son, soc, soh, sow), zs, mask=mask)
    if RELU_BITS:
        WORD: tl.constexpr = 32 if BLOCK_K >= 32 else BLOCK_K
        on = (mask & ~(zs <= 0)).to(tl.int32)   # of the value stored (a NaN passes, as in threshold_backward)
        shifts = tl.arange(0, WORD)
        words = tl.sum(tl.reshape(on, (BLOCK_M, BLOCK_K // WORD, WORD)) << shifts[None, None, :], axis=2)
        word = tl.program_id(1) * (BLOCK_K // WORD) + tl.arange(0, BLOCK_K // WORD)
        tl.store(bits_ptr + offs_m.to(tl.int64)[:, None] * n_words + word[None, :], words,
                 mask=mask_m[:, None] & (word < n_words)[None, :])


@triton.jit
def channel_centre(ptr, offs_k, mask_k, s_c):
    """Per column, the channel's first value (row 0) in fp32, or 0 where it is not finite: the centre v0 of a
    centred sum sum g (v - v0) + v0 sum g (reference.sum_centred)."""
    v0 = tl.load(ptr + offs_k.to(tl.int64) * s_c, mask=mask_k, other=0.0).to(tl.float32)
    return tl.where(tl.abs(v0) < float("inf"), v0, 0.0)


@triton.jit
def rows_tile(ptr, flat_offs, offs_k, mask, n, h, w, s_n, s_c, s_h, s_w, FLAT: tl.constexpr):
    """One (rows x channels) tile of a 4-D tensor: at `ptr` + flat_offs (FLAT: this program's rows dense at
    m * K + k from `ptr`), else at its strides from (n, h, w, k)."""
    if FLAT:
        v = tl.load(ptr + flat_offs, mask=mask, other=0.0)
    else:
        v = tl.load(ptr + tile_offsets(n, h, w, offs_k.to(tl.int64), s_n, s_c, s_h, s_w), mask=mask, other=0.0)
    return v


@triton.jit
def store_rows_tile(ptr, value, flat_offs, offs_k, mask, n, h, w, s_n, s_c, s_h, s_w, FLAT: tl.constexpr):
    """Store `value` (cast to the tensor's dtype) into one tile of a 4-D tensor, addressed as rows_tile."""
    value = value.to(ptr.dtype.element_ty)
    if FLAT:
        tl.store(ptr + flat_offs, value, mask=mask)
    else:
        tl.store(ptr + tile_offsets(n, h, w, offs_k.to(tl.int64), s_n, s_c, s_h, s_w), value, mask=mask)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED + ["ROWS"])
def _bn_apply_bwd_kernel(
    go_ptr,         # grad_out (N, K, H, W), any strides
    out_ptr,        # forward output (ReLU mask), any strides, or unused
    y_ptr,          # forward input y, any strides (read when d_scale is needed)
    res_ptr,        # residual, any strides, or unused
    scale_ptr,      # (K,) contiguous
    rscale_ptr,     # (K,) residual_scale, contiguous, or unused
    dy_ptr,         # out: dy, any strides, or unused
    dres_ptr,       # out: d_residual, any strides, or unused
    part_ptr,       # out (SUMS): (programs along M + chunks, 3, K) fp32 [sum g (y - y0), sum g, sum g (r - r0)]:
                    # one slot a program (the rows asked for), then the chunks' level-2 slots (slot_chunks)
    dscale_ptr,     # out: (K,) fp32 d_scale = sum g*y (SUM_GY), or unused
    dshift_ptr,     # out: (K,) fp32 d_shift = sum g (SUM_G), or unused
    drscale_ptr,    # out: (K,) fp32 d_residual_scale = sum g*residual (SUM_GR), or unused
    drshift_ptr,    # out: (K,) fp32 d_residual_shift = sum g (SUM_G_RES), or unused
    sem_ptr,        # (chunk_counters(column blocks, chunks),) int32 counters, 0 at launch, left at 0 (SUMS), or
                    # unused
    K, H, W, M,                  # channels, height, width, M = N*H*W
    ROWS,                        # rows a program: a multiple of BLOCK_M (its loop's steps)
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
    FLAT: tl.constexpr,          # every tensor's element (m, k) at m * K + k (channels_last and its likes): no
                                 # (n, h, w) from m, 32-bit offsets from the program's first row
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,       # slots per step of the reduction (REDUCE_SLOTS)
    CHUNK: tl.constexpr,         # slots per chunk of the two-level reduction (CHUNK_SLOTS)
):
    pid_m = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    if STORE_DY:
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
    if STORE_DRES and HAS_RSCALE:
        rscale = tl.load(rscale_ptr + offs_k, mask=mask_k, other=0.0)
    # the sums accumulate element-wise over the program's rows, and are summed across rows once, at the end
    acc_g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_gy = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_gr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if SUM_GY:
        y0 = channel_centre(y_ptr, offs_k, mask_k, syc)
    if SUM_GR:
        r0 = channel_centre(res_ptr, offs_k, mask_k, src)
    row0 = pid_m * ROWS
    go_rows, out_rows, y_rows, res_rows, dy_rows, dres_rows = go_ptr, out_ptr, y_ptr, res_ptr, dy_ptr, dres_ptr
    if FLAT:   # the program's rows from here on: 32-bit offsets (ROWS * K < 2**31, the launcher checks)
        first = row0.to(tl.int64) * K
        go_rows += first
        out_rows += first
        y_rows += first
        res_rows += first
        dy_rows += first
        dres_rows += first
    rows = tl.arange(0, BLOCK_M)
    for r in range(0, ROWS, BLOCK_M):
        offs_m = row0 + r + rows
        mask = (offs_m < M)[:, None] & mask_k[None, :]
        if FLAT:
            flat = (r + rows)[:, None] * K + offs_k[None, :]
            n = 0
            h = 0
            w = 0
        else:
            flat = 0
            n = (offs_m // (H * W)).to(tl.int64)
            hw = offs_m % (H * W)
            h = (hw // W).to(tl.int64)
            w = (hw % W).to(tl.int64)
        # every load of the step before any store (a store may alias a later load: the compiler keeps their order),
        # so that a step waits for one memory round trip, not two
        g = rows_tile(go_rows, flat, offs_k, mask, n, h, w, sgn, sgc, sgh, sgw, FLAT).to(tl.float32)
        if RELU:
            o = rows_tile(out_rows, flat, offs_k, mask, n, h, w, son, soc, soh, sow, FLAT)
        if SUM_GY:
            yv = rows_tile(y_rows, flat, offs_k, mask, n, h, w, syn, syc, syh, syw, FLAT).to(tl.float32)
        if SUM_GR:
            rv = rows_tile(res_rows, flat, offs_k, mask, n, h, w, srn, src, srh, srw, FLAT).to(tl.float32)
        if RELU:
            g = tl.where(o <= 0, 0.0, g)
        if STORE_DY:
            store_rows_tile(dy_rows, g * scale[None, :], flat, offs_k, mask, n, h, w, sdn, sdc, sdh, sdw, FLAT)
        if STORE_DRES:
            dr = g
            if HAS_RSCALE:
                dr = g * rscale[None, :]
            store_rows_tile(dres_rows, dr, flat, offs_k, mask, n, h, w, sen, sec, seh, sew, FLAT)
        if SUMS:
            acc_g += g
        if SUM_GY:
            acc_gy += g * (yv - y0[None, :])
        if SUM_GR:
            acc_gr += g * (rv - r0[None, :])
    if SUMS:
        # one slot a program: sum g always (the centred sums' v0 * sum g is added to the totals), the others asked
        slot = part_ptr + pid_m.to(tl.int64) * 3 * K + offs_k
        tl.store(slot + K, tl.sum(acc_g, axis=0), mask=mask_k)
        if SUM_GY:
            tl.store(slot, tl.sum(acc_gy, axis=0), mask=mask_k)
        if SUM_GR:
            tl.store(slot + 2 * K, tl.sum(acc_gr, axis=0), mask=mask_k)
        _sums_if_last(part_ptr, dscale_ptr, dshift_ptr, drscale_ptr, drshift_ptr, sem_ptr, y_ptr, syc, res_ptr, src,
                      K, SUM_GY, SUM_G, SUM_GR, SUM_G_RES, BLOCK_S, BLOCK_K, CHUNK)


@triton.jit(noinline=True)
def _sums_if_last(part_ptr, dscale_ptr, dshift_ptr, drscale_ptr, drshift_ptr, sem_ptr, y_ptr, syc, res_ptr, src, K,
                  SUM_GY: tl.constexpr, SUM_G: tl.constexpr, SUM_GR: tl.constexpr, SUM_G_RES: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """d_scale, d_shift, d_residual_scale, d_residual_shift of this column block (those asked for) from the
    (programs along M, 3, K) slots [sum g (y - y0), sum g, sum g (r - r0)], in two levels (sum_chunks_if_last: the
    last program of each chunk of CHUNK slots, then the last chunk; the level-2 slots after the slots), written by
    the last program, the centred sums completed there: sum g*y = sum g (y - y0) + y0 sum g (y0 the channel's first
    value, reference.sum_centred); counters left at 0."""
    pid_k = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    n_slots = tl.num_programs(0)
    chunk, arrivals, first, count = slot_chunk(tl.program_id(0), n_slots, 0, n_slots, CHUNK, CHUNK)
    level2 = part_ptr + tl.cast(n_slots, tl.int64) * 3 * K
    t_gy, t_g, t_gr, final = sum_chunks_if_last(part_ptr, level2, 3 * K, K, sem_ptr, pid_k, tl.num_programs(1),
                                                tl.cdiv(n_slots, CHUNK), chunk, arrivals, first, count, offs, mask,
                                                SUM_GY, True, SUM_GR, BLOCK_S, BLOCK_K)
    if final:
        if SUM_GY:
            y0 = channel_centre(y_ptr, offs, mask, syc)
            tl.store(dscale_ptr + offs, t_gy + tl.where(y0 == 0.0, 0.0, y0 * t_g), mask=mask)
        if SUM_G:
            tl.store(dshift_ptr + offs, t_g, mask=mask)
        if SUM_G_RES:
            tl.store(drshift_ptr + offs, t_g, mask=mask)
        if SUM_GR:
            r0 = channel_centre(res_ptr, offs, mask, src)
            tl.store(drscale_ptr + offs, t_gr + tl.where(r0 == 0.0, 0.0, r0 * t_g), mask=mask)


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


_APPLY_PLANS = LaunchPlans("bn_apply")
_APPLY_BWD_PLANS = LaunchPlans("bn_apply_bwd")


def _vec32(t: Tensor) -> Tensor:
    """A per-channel vector as contiguous fp32: the vector itself (no copy, no launch) when it already is."""
    return t.to(torch.float32).contiguous()


def _is_vec32(t: Optional[Tensor]) -> bool:
    """Whether _vec32(t) is t itself (a plan records it: the run then skips the two calls)."""
    return t is None or (t.dtype == torch.float32 and t.is_contiguous())


def _plain_args(tiles: Optional[dict], args: tuple) -> bool:
    """Whether a call may use a memoised plan: no test `tiles`, only tensors / None / bools / ints as arguments
    (anything else goes to the checks every time, for its TypeError)."""
    if tiles is not None:
        return False
    for a in args:
        if a is not None and not isinstance(a, (Tensor, bool, int)):
            return False
    return True


class _ApplyPlan:
    """bn_apply's launch from its arguments' metadata (LaunchPlans): checks passed, tiles, grid, the integer
    arguments, the constexprs, and which vectors need a cast to contiguous fp32."""

    __slots__ = ("shape", "M", "grid", "scalars", "meta", "res_affine", "cast")

    def __init__(self, y, scale, shift, residual, residual_scale, residual_shift, relu, tiles):
        _check_apply_args(y, scale, shift, residual, residual_scale, residual_shift)
        N, K, H, W = y.shape
        self.shape, self.M = tuple(y.shape), N * H * W
        block_m, block_k = _tiles(K, tiles)
        has_res = residual is not None
        self.res_affine = has_res and (residual_scale is not None or residual_shift is not None)
        self.grid = (cdiv(self.M, block_m), cdiv(K, block_k))
        out_strides = channels_last_strides(y.shape)
        self.scalars = (K, H, W, self.M, cdiv(K, 32), *strides4(y), *strides4(residual), *out_strides)
        self.meta = dict(HAS_RES=has_res, RES_AFFINE=self.res_affine, RELU=bool(relu), RELU_BITS=False,
                         BLOCK_M=block_m, BLOCK_K=block_k)
        self.cast = not (_is_vec32(scale) and _is_vec32(shift) and _is_vec32(residual_scale)
                         and _is_vec32(residual_shift))


def bn_apply_fwd(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool,
                 tiles: Optional[dict] = None) -> Tensor:
    """Launcher of bn_apply; `tiles` overrides BLOCK_M / BLOCK_K. Its checks and launch configuration are
    memoised on the arguments' metadata (_ApplyPlan, LaunchPlans)."""
    args = (y, scale, shift, residual, residual_scale, residual_shift, relu)
    if not _plain_args(tiles, args):
        plan = _ApplyPlan(*args, tiles)
    else:
        key = (tensor_key(y), tensor_key(scale), tensor_key(shift), tensor_key(residual),
               tensor_key(residual_scale), tensor_key(residual_shift), bool(relu))
        plan = _APPLY_PLANS.get(key) or _APPLY_PLANS.put(key, _ApplyPlan(*args, tiles))
    return _run_apply(plan, y, scale, shift, residual, residual_scale, residual_shift)


def bn_apply_relu_bits(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       residual_scale: Optional[Tensor], residual_shift: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(bn_apply(..., relu=True), its ReLU mask as bits): (M = N*H*W, cdiv(K, 32)) int32, bit k % 32 of word k // 32
    of row m = (n*H + h)*W + w set where out is not <= 0 (where torch's threshold_backward passes the gradient). A
    backward that needs the mask reads M*K/8 bytes instead of out (optional backend function: ops/conv_bn_junction).
    One launch, as bn_apply."""
    args = (y, scale, shift, residual, residual_scale, residual_shift, True)
    key = ("bits", tensor_key(y), tensor_key(scale), tensor_key(shift), tensor_key(residual),
           tensor_key(residual_scale), tensor_key(residual_shift))
    plan = _APPLY_PLANS.get(key)
    if plan is None:
        plan = _ApplyPlan(*args, None)
        plan.meta = dict(plan.meta, RELU_BITS=True)
        plan = _APPLY_PLANS.put(key, plan)
    bits = torch.empty(plan.M, cdiv(plan.shape[1], 32), dtype=torch.int32, device=y.device)
    return _run_apply(plan, y, scale, shift, residual, residual_scale, residual_shift, bits), bits


def _run_apply(plan: _ApplyPlan, y, scale, shift, residual, residual_scale, residual_shift,
               bits: Optional[Tensor] = None) -> Tensor:
    out = empty_channels_last(plan.shape, y.dtype, y.device)
    if plan.M * plan.shape[1] == 0:
        return out
    K = plan.shape[1]
    if plan.res_affine:
        rscale, rshift = affine_pair(residual_scale, residual_shift, K, y)
    else:
        rscale = rshift = dummy(y.device)
    if plan.cast:
        scale, shift, rscale, rshift = _vec32(scale), _vec32(shift), _vec32(rscale), _vec32(rshift)
    _bn_apply_kernel[plan.grid](y, scale, shift, y if residual is None else residual, rscale, rshift, out,
                                out if bits is None else bits, *plan.scalars, **plan.meta)
    return out


# The backward's tiles on a GPU: BLOCK_M x BLOCK_K = BWD_TILE_ELEMS elements a loop step (8 a thread on 4 warps: one
# 16-byte load of each 2-byte input), and each program loops over ROWS = steps x BLOCK_M rows, the steps (at most
# BWD_MAX_STEPS, a power of two) as many as leave BWD_PROGRAMS programs (~8 an H100 SM): the cross-row sums, their
# shared-memory round trips and the slot's arrival at its counter come once a program, not once a tile. Half the
# elements for 4-byte activations (the same bytes a step), half with the residual's sum (a third accumulator;
# bwd_tile_elems). Chosen by bench/kernel_audit.py's model over the PE-(2,4,1) shapes, fp16 (sum of floors over sum of
# modelled times; 2048 / 2048: 83.7 %, 2048 / 1024: 87.8 %, 1024 / 1024: 88.9 %, 512 / 1024: 89.4 % with more
# per-program overhead unmodelled); not measured. No variant spills (sm_90, Triton 3.6 and 3.9; the strided path at
# 2048 elements did, 408 bytes).
BWD_TILE_ELEMS = 1024
BWD_PROGRAMS = 1024
BWD_MAX_STEPS = 16
BWD_TILE_KEYS = frozenset({"BLOCK_M", "BLOCK_K", "ROWS"})


def bwd_tile_elems(sum_residual: bool, itemsize: int) -> int:
    """Elements a loop step of the backward on a GPU: BWD_TILE_ELEMS for 2-byte activations, halved for 4-byte ones
    and again with the residual's sum."""
    return BWD_TILE_ELEMS * 2 // max(itemsize, 2) // (2 if sum_residual else 1)


def bwd_tiles(M: int, K: int, tiles: Optional[dict], elems: int = BWD_TILE_ELEMS) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, ROWS) of bn_apply's backward, `elems` a step on a GPU (bwd_tile_elems); `tiles` may set
    any of them (ROWS a multiple of BLOCK_M; by default one step a program when a tile is set, else the steps
    BWD_PROGRAMS leaves)."""
    tiles = tiles or {}
    unknown = set(tiles) - BWD_TILE_KEYS
    if unknown:
        raise ValueError(f"bn_apply backward tiles: unknown key(s) {sorted(unknown)}; known: {sorted(BWD_TILE_KEYS)}")
    block_k = tiles.get("BLOCK_K") or pow2_tile(K, 16, 256 if INTERPRET else 128)
    block_m = tiles.get("BLOCK_M") or max(1, (8192 if INTERPRET else elems) // block_k)
    rows = tiles.get("ROWS")
    if rows is None:
        steps, m_tiles, n_cols = 1, cdiv(M, block_m), cdiv(K, block_k)
        if not INTERPRET and not tiles:
            while steps < BWD_MAX_STEPS and cdiv(m_tiles, 2 * steps) * n_cols >= BWD_PROGRAMS:
                steps *= 2
        rows = steps * block_m
    if rows <= 0 or rows % block_m:
        raise ValueError(f"bn_apply backward tiles: ROWS = {rows} must be a positive multiple of BLOCK_M = {block_m}")
    return block_m, block_k, rows


def flat_rows(t: Optional[Tensor], N: int, K: int, H: int, W: int) -> bool:
    """Whether element (m, k) of an (N, K, H, W) tensor, m = (n H + h) W + w, lies at m * K + k (channels_last and
    its likes); an absent tensor does not stand in the way."""
    if t is None:
        return True
    _, sc, _, sw = t.stride()
    return dense_rows(t.stride(), N, H, W) and sw == K and (sc == 1 or K == 1)


class _ApplyBwdPlan:
    """bn_apply_backward's launch from its arguments' metadata (LaunchPlans); see _ApplyPlan."""

    __slots__ = ("shape", "res_shape", "M", "needs", "sums", "n_cols", "n_sems", "part_shape", "grid", "scalars",
                 "meta", "cast")

    def __init__(self, grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out, needs_grad,
                 tiles):
        _check_apply_bwd_args(grad_out, y, scale, shift, residual, residual_scale, residual_shift, bool(relu),
                              out if relu else None, len(needs_grad))
        need_y, need_scale, need_shift, need_res, need_rscale, need_rshift = needs_grad
        has_res = residual is not None
        has_rscale = has_res and residual_scale is not None
        need_res = need_res and has_res
        need_rscale = need_rscale and has_rscale
        need_rshift = need_rshift and has_res and residual_shift is not None
        self.needs = (need_y, need_scale, need_shift, need_res, need_rscale, need_rshift)
        self.sums = (need_scale, need_shift, need_rscale, need_rshift)
        N, K, H, W = y.shape
        self.shape, self.M = tuple(y.shape), N * H * W
        self.res_shape = tuple(residual.shape) if has_res else None
        flat = all(flat_rows(t, N, K, H, W) for t in (grad_out, out if relu else None, y, residual))
        block_m, block_k, rows = bwd_tiles(self.M, K, tiles, bwd_tile_elems(need_rscale, y.element_size()))
        self.n_cols = cdiv(K, block_k)
        # One slot a program along M, then the chunks' level-2 slots; no slot buffer without sums.
        slots = cdiv(self.M, rows)
        self.n_sems = chunk_counters(self.n_cols, slot_chunks(slots))
        self.part_shape = (slots + slot_chunks(slots), 3, K) if any(self.sums) else None
        self.grid = (slots, self.n_cols)
        cl = channels_last_strides(y.shape)
        # FLAT: every tensor read at m * K + k (the outputs are channels_last); a program's rows * K in 32 bits
        flat = flat and rows * K < 2**31
        self.scalars = (K, H, W, self.M, rows, *strides4(grad_out), *strides4(out if relu else None), *strides4(y),
                        *strides4(residual), *(cl if need_y else (0, 0, 0, 0)),
                        *(channels_last_strides(residual.shape) if need_res else (0, 0, 0, 0)))
        self.meta = dict(RELU=bool(relu), HAS_RSCALE=has_rscale, STORE_DY=need_y, SUM_GY=need_scale,
                         STORE_DRES=need_res, SUM_GR=need_rscale, SUM_G=need_shift, SUM_G_RES=need_rshift,
                         SUMS=any(self.sums), FLAT=flat, BLOCK_M=block_m, BLOCK_K=block_k,
                         BLOCK_S=REDUCE_SLOTS, CHUNK=CHUNK_SLOTS)
        self.cast = not (_is_vec32(scale) and (not has_rscale or _is_vec32(residual_scale)))


def bn_apply_bwd(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool, out: Tensor,
                 needs_grad: Sequence[bool], tiles: Optional[dict] = None) -> list[Optional[Tensor]]:
    """Launcher of bn_apply_backward; `tiles` overrides BLOCK_M / BLOCK_K / ROWS (bwd_tiles; another key is a
    ValueError). Its checks and launch configuration are memoised on the arguments' metadata (_ApplyBwdPlan,
    LaunchPlans)."""
    needs_grad = tuple(bool(v) for v in needs_grad)
    args = (grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out if relu else None)
    if not _plain_args(tiles, args):
        plan = _ApplyBwdPlan(*args, needs_grad, tiles)
    else:
        key = (tensor_key(grad_out), tensor_key(y), tensor_key(scale), tensor_key(shift), tensor_key(residual),
               tensor_key(residual_scale), tensor_key(residual_shift), bool(relu),
               tensor_key(out) if relu else None, needs_grad)
        plan = _APPLY_BWD_PLANS.get(key) or _APPLY_BWD_PLANS.put(key, _ApplyBwdPlan(*args, needs_grad, tiles))
    return _run_apply_bwd(plan, grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out)


def _run_apply_bwd(plan: _ApplyBwdPlan, grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu,
                   out) -> list[Optional[Tensor]]:
    need_y, need_scale, need_shift, need_res, need_rscale, need_rshift = plan.needs
    result: list[Optional[Tensor]] = [None] * 6
    if not any(plan.needs):
        return result
    device = y.device
    dy = empty_channels_last(plan.shape, y.dtype, device) if need_y else None
    dres = empty_channels_last(plan.res_shape, residual.dtype, device) if need_res else None
    part = dummy(device) if plan.part_shape is None else torch.empty(*plan.part_shape, dtype=torch.float32,
                                                                     device=device)
    # d_scale, d_shift, d_residual_scale, d_residual_shift (= sum g again, a tensor of its own), summed in the
    # kernel; zeros for an empty input (no program runs)
    K = plan.shape[1]
    make = torch.zeros if plan.M == 0 else torch.empty
    for index, flag in zip((1, 2, 4, 5), plan.sums):
        if flag:
            result[index] = make(K, dtype=torch.float32, device=device)
    result[0], result[3] = dy, dres
    if plan.M * K == 0:  # an empty input launches nothing
        return result
    unused = dummy(device)
    sems = stream_counters(plan.n_sems, device) if any(plan.sums) else dummy(device, torch.int32)
    rscale = residual_scale if plan.meta["HAS_RSCALE"] else unused
    if plan.cast:
        scale, rscale = _vec32(scale), _vec32(rscale)
    _bn_apply_bwd_kernel[plan.grid](
        grad_out, out if relu else grad_out, y, y if residual is None else residual, scale, rscale,
        y if dy is None else dy, y if dres is None else dres, part,
        *(unused if result[index] is None else result[index] for index in (1, 2, 4, 5)), sems,
        *plan.scalars, **plan.meta)
    return result


def bn_apply(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    """Triton implementation of pe_kernels.reference.bn_apply."""
    return bn_apply_fwd(y, scale, shift, residual, residual_scale, residual_shift, relu)


def bn_apply_keyed(op_key: tuple, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                   residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool) -> Tensor:
    """bn_apply with its launch plan keyed on `op_key`, the op's key of these arguments (ops/conv_bn_act: what fixes
    every argument's metadata and the flag), instead of a key of its own."""
    key = ("op", op_key)
    plan = _APPLY_PLANS.get(key)
    if plan is None:
        plan = _APPLY_PLANS.put(key, _ApplyPlan(y, scale, shift, residual, residual_scale, residual_shift, relu, None))
    return _run_apply(plan, y, scale, shift, residual, residual_scale, residual_shift)


def bn_apply_backward(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                      residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool,
                      out: Tensor, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Triton implementation of pe_kernels.reference.bn_apply_backward (APPLY_GRAD_NAMES order)."""
    return bn_apply_bwd(grad_out, y, scale, shift, residual, residual_scale, residual_shift, relu, out,
                        needs_grad)
