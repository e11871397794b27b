"""BatchNorm apply (+ the residual-block tail) and its backward, each in one pass over NHWC tiles.

Math (pe_kernels.reference.bn_apply / bn_apply_backward)::

    out = act(y * scale[k] + shift[k] + residual * residual_scale[k] + residual_shift[k])

    g = where(out <= 0, 0, grad_out)  (if relu; torch's ReLU backward: a NaN out passes the gradient)
    dy = g * scale,  d_scale = sum g * y,  d_shift = sum g
    d_residual = g * residual_scale,  d_residual_scale = sum g * residual,  d_residual_shift = sum g

The scale sums are formed centred on each tile's mean (sum_centred): sum g (y - m_t) + m_t sum g, so that the BN
weight gradient, sum g*y - mean * sum g, keeps the accuracy of stock BatchNorm's sum g (y - mean).

Sums run over (n, h, w). The backward reads grad_out, out, y and residual once and writes dy, d_residual and
per-slot fp32 partials (slots, 3, K) [sum g*y, sum g, sum g*residual]; in the same launch they are summed in two
levels (_common.sum_chunks_if_last): the last M tile of each chunk of CHUNK_SLOTS slots to arrive at its counter
(_common.last_arrival, counters from _common.stream_counters, reset by their last programs) sums the chunk, the last
chunk of each column block sums the chunks' totals, in fixed orders (deterministic, no atomics on values), into the
needed sums, each a tensor of its own; every slot is written (store_part), so the buffer needs no zeroing. Launches:
the apply, one kernel; its backward, one; no other device work.
Grid: (tiles of M = N*H*W, tiles of K). Any input strides; outputs channels_last.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import (CHUNK_SLOTS, INTERPRET, REDUCE_SLOTS, LaunchPlans, Tensor, affine_pair, cdiv,
                      channels_last_strides, check_4d, check_activation_dtype, check_same_device, check_shape,
                      check_vector, chunk_counters, dummy, empty_channels_last, nhwc_tile, pow2_tile, slot_chunk,
                      slot_chunks, store_part, stream_counters, strides4, sum_chunks_if_last, tensor_key,
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
    part_ptr,       # out: (cdiv(M, PART_M) + chunks, 3, K) fp32 [sum g*y, sum g, sum g*residual]: every slot
                    # written, then the chunks' level-2 slots (slot_chunks)
    dscale_ptr,     # out: (K,) fp32 d_scale = sum g*y (SUM_GY), or unused
    dshift_ptr,     # out: (K,) fp32 d_shift = sum g (SUM_G), or unused
    drscale_ptr,    # out: (K,) fp32 d_residual_scale = sum g*residual (SUM_GR), or unused
    drshift_ptr,    # out: (K,) fp32 d_residual_shift = sum g (SUM_G_RES), or unused
    sem_ptr,        # (chunk_counters(column blocks, chunks),) int32 counters, 0 at launch, left at 0 (SUMS), or
                    # unused
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
    CHUNK: tl.constexpr,         # slots per chunk of the two-level reduction (CHUNK_SLOTS)
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
                      SUM_GR, SUM_G_RES, PART_M, BLOCK_S, BLOCK_K, CHUNK)


@triton.jit(noinline=True)
def _sums_if_last(part_ptr, dscale_ptr, dshift_ptr, drscale_ptr, drshift_ptr, sem_ptr, K, M, SUM_GY: tl.constexpr,
                  SUM_G: tl.constexpr, SUM_GR: tl.constexpr, SUM_G_RES: tl.constexpr, PART_M: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """d_scale, d_shift, d_residual_scale, d_residual_shift of this column block from the (cdiv(M, PART_M), 3, K)
    partials (those asked for), in two levels (sum_chunks_if_last: the last tile of each chunk of CHUNK slots, then
    the last chunk; the level-2 slots after the slots), written by the last program; counters left at 0."""
    pid_k = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    n_slots = tl.cdiv(M, PART_M)
    chunk, arrivals, first, count = slot_chunk(tl.program_id(0), tl.num_programs(0), 0, n_slots, CHUNK, CHUNK)
    level2 = part_ptr + tl.cast(n_slots, tl.int64) * 3 * K
    t_gy, t_g, t_gr, final = sum_chunks_if_last(part_ptr, level2, 3 * K, K, sem_ptr, pid_k, tl.num_programs(1),
                                                tl.cdiv(n_slots, CHUNK), chunk, arrivals, first, count, offs, mask,
                                                SUM_GY, SUM_G or SUM_G_RES, SUM_GR, BLOCK_S, BLOCK_K)
    if final:
        if SUM_GY:
            tl.store(dscale_ptr + offs, t_gy, mask=mask)
        if SUM_G:
            tl.store(dshift_ptr + offs, t_g, mask=mask)
        if SUM_G_RES:
            tl.store(drshift_ptr + offs, t_g, mask=mask)
        if SUM_GR:
            tl.store(drscale_ptr + offs, t_gr, mask=mask)


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
        block_m, block_k = _tiles(K, tiles)
        self.n_cols = cdiv(K, block_k)
        # Slots of PART_M = block_m rows, all written by any BLOCK_M multiple of it (store_part), then the chunks'.
        slots = cdiv(self.M, block_m)
        self.n_sems = chunk_counters(self.n_cols, slot_chunks(slots))
        self.part_shape = (slots + slot_chunks(slots), 3, K)
        self.grid = (cdiv(self.M, block_m), self.n_cols)
        cl = channels_last_strides(y.shape)
        self.scalars = (K, H, W, self.M, *strides4(grad_out), *strides4(out if relu else None), *strides4(y),
                        *strides4(residual), *(cl if need_y else (0, 0, 0, 0)),
                        *(channels_last_strides(residual.shape) if need_res else (0, 0, 0, 0)))
        self.meta = dict(RELU=bool(relu), HAS_RSCALE=has_rscale, STORE_DY=need_y, SUM_GY=need_scale,
                         STORE_DRES=need_res, SUM_GR=need_rscale, SUM_G=need_shift, SUM_G_RES=need_rshift,
                         SUMS=any(self.sums), PART_M=block_m, BLOCK_M=block_m, BLOCK_K=block_k,
                         BLOCK_S=REDUCE_SLOTS, CHUNK=CHUNK_SLOTS)
        self.cast = not (_is_vec32(scale) and (not has_rscale or _is_vec32(residual_scale)))


def bn_apply_bwd(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                 residual_scale: Optional[Tensor], residual_shift: Optional[Tensor], relu: bool, out: Tensor,
                 needs_grad: Sequence[bool], tiles: Optional[dict] = None) -> list[Optional[Tensor]]:
    """Launcher of bn_apply_backward; `tiles` overrides BLOCK_M / BLOCK_K. Its checks and launch configuration
    are memoised on the arguments' metadata (_ApplyBwdPlan, LaunchPlans)."""
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
    part = torch.empty(*plan.part_shape, dtype=torch.float32, device=device)
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
