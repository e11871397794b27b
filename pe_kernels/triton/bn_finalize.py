"""BatchNorm finalize: batch statistics -> affine map, the running-statistics update of BatchNorm2d, and the
finalize's backward.

Math (pe_kernels.reference.bn_finalize / bn_running_update / bn_train_finalize / bn_finalize_backward),
stats = [mean, m2] per channel (m2 = the sum of squared deviations), n = count::

    mean = stats[0],  var = stats[1] / n,  invstd = 1 / sqrt(var + eps)     (no clamp: a NaN m2 stays NaN)
    scale = weight * invstd,  shift = bias - mean * scale          (weight = 1, bias = 0 when absent)
    num_batches_tracked += 1                                          (bn_train_finalize, when given)
    running_mean = (1 - f) * running_mean + f * mean
    running_var  = (1 - f) * running_var  + f * m2 / (n - 1)                        (unbiased)
    f = momentum, or 1 / num_batches_tracked (after the bump, read on the device) when momentum is None

    backward, g_tot = g_scale - mean * g_shift:
    d_weight = g_tot * invstd,  d_bias = g_shift,  d_stats = [-scale * g_shift, g_tot * w * (-1/2) invstd^3 / n]

One launch per call, no other GPU work: `_bn_finalize_kernel` (runtime flags, so one compiled kernel serves
bn_finalize, bn_running_update and bn_train_finalize) is a single program that loops over the channels, so the
num_batches_tracked read-modify-write happens once, before the factor is used (K <= a few thousand: a few loop
steps). The per-channel math is `finalize_channels` (and `running_factor` for f), which conv_fwd.py's kernel also
calls to finalize its own columns in the conv's launch (conv_bn_train). An absent weight / bias / gradient is read
from a cached identity vector (no torch.ones / zeros launch).
fp32 math; running buffers updated in place in their own dtype and strides.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import Tensor, cdiv, check_same_device, check_vector, dummy, identity_vector

_BLOCK = 1024  # channels per loop step of the single-program finalize; per program of the backward's grid


@triton.jit
def running_factor(nbt, momentum, cumulative):
    """f of the running update: momentum, or 1 / nbt (num_batches_tracked after the bump, an integer scalar) when
    `cumulative` is nonzero (momentum None), computed in fp64 and rounded once to fp32."""
    f = momentum
    if cumulative != 0:
        f = (1.0 / nbt.to(tl.float64)).to(tl.float32)
    return f


@triton.jit
def finalize_channels(mean, m2, offs, mask, count, eps, f, weight_ptr, sw, bias_ptr, sb, scale_ptr, shift_ptr,
                      rmean_ptr, srm, rvar_ptr, srv, affine, running):
    """The finalize of channels `offs` (`mask`ed) from their fp32 batch statistics mean, m2 (count values each):
    scale = w / sqrt(m2/count + eps), shift = b - mean * scale into the fp32 contiguous scale/shift (when `affine`);
    running_mean/var (strides srm, srv; updated in their own dtype) <- (1 - f) * old + f * (mean, m2 / (count - 1))
    (when `running`). `affine`, `running`: ints, runtime or literal."""
    if affine != 0:
        var = m2 / count
        scale = tl.load(weight_ptr + offs * sw, mask=mask, other=0.0).to(tl.float32) / tl.sqrt_rn(var + eps)
        shift = tl.load(bias_ptr + offs * sb, mask=mask, other=0.0).to(tl.float32) - mean * scale
        tl.store(scale_ptr + offs, scale, mask=mask)
        tl.store(shift_ptr + offs, shift, mask=mask)
    if running != 0:
        rm = tl.load(rmean_ptr + offs * srm, mask=mask, other=0.0)
        rv = tl.load(rvar_ptr + offs * srv, mask=mask, other=0.0)
        rm = rm.to(tl.float32) * (1.0 - f) + f * mean
        rv = rv.to(tl.float32) * (1.0 - f) + f * (m2 / (count - 1.0))
        tl.store(rmean_ptr + offs * srm, rm.to(rmean_ptr.dtype.element_ty), mask=mask)
        tl.store(rvar_ptr + offs * srv, rv.to(rvar_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K", "s_row", "s_col", "sw", "sb", "srm", "srv", "affine", "running", "has_nbt",
                               "cumulative"])
def _bn_finalize_kernel(
    stats_ptr,      # (2, K) fp32 [mean, m2]
    weight_ptr,     # (K,) BN weight (gamma; cached ones when absent) or unused
    bias_ptr,       # (K,) BN bias (beta; cached zeros when absent) or unused
    scale_ptr,      # out: (K,) fp32 contiguous, or unused
    shift_ptr,      # out: (K,) fp32 contiguous, or unused
    rmean_ptr,      # in/out: running_mean (K,) or unused
    rvar_ptr,       # in/out: running_var (K,) or unused
    nbt_ptr,        # in/out: num_batches_tracked (a 0-d integer tensor) or unused
    K,              # channels
    s_row, s_col,   # stats strides
    sw, sb,         # weight / bias strides (1 when unused)
    srm, srv,       # running_mean / running_var strides (1 when unused)
    count,          # n, the number of values per channel (float)
    eps,            # BN epsilon
    momentum,       # running-statistics factor f when `cumulative` is 0
    affine,         # 1: write scale, shift (runtime flags: one compiled kernel serves every use)
    running,        # 1: update running_mean, running_var
    has_nbt,        # 1: num_batches_tracked += 1
    cumulative,     # 1: f = 1 / num_batches_tracked after the bump (momentum None)
    BLOCK: tl.constexpr,
):
    # One program: the counter is bumped once, and read back by the same program only.
    f = momentum
    if has_nbt != 0:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
        f = running_factor(nbt, momentum, cumulative)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        mean = tl.load(stats_ptr + offs * s_col, mask=mask, other=0.0).to(tl.float32)
        m2 = tl.load(stats_ptr + s_row + offs * s_col, mask=mask, other=0.0).to(tl.float32)
        finalize_channels(mean, m2, offs, mask, count, eps, f, weight_ptr, sw, bias_ptr, sb, scale_ptr, shift_ptr,
                          rmean_ptr, srm, rvar_ptr, srv, affine, running)


@triton.jit
def bn_finalize_grads(g_scale, g_shift, mean, m2, w, count, eps):
    """The BN finalize's backward per channel (fp32 vectors; reference.bn_finalize_backward): with
    invstd = 1 / sqrt(m2/count + eps), scale = w invstd, shift = b - mean scale and g_tot = g_scale - mean g_shift,
    returns (d_weight, d_bias, d_mean, d_m2) = (g_tot invstd, g_shift, -w invstd g_shift,
    g_tot w (-1/2) invstd^3 / count)."""
    invstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
    g_tot = g_scale - mean * g_shift
    d_mean = -(w * invstd) * g_shift
    d_m2 = g_tot * w * (-0.5) * (invstd * invstd * invstd) / count
    return g_tot * invstd, g_shift, d_mean, d_m2


@triton.jit(do_not_specialize=["K", "s_row", "s_col", "sgs", "sgb", "sw", "need_stats", "need_weight",
                               "need_bias"])
def _bn_finalize_bwd_kernel(
    gscale_ptr,     # (K,) gradient of scale (cached zeros when absent)
    gshift_ptr,     # (K,) gradient of shift (cached zeros when absent)
    stats_ptr,      # (2, K) fp32 [mean, m2]
    weight_ptr,     # (K,) BN weight (cached ones when absent)
    dstats_ptr,     # out: (2, K) fp32 contiguous, or unused
    dweight_ptr,    # out: (K,) in weight's dtype, or unused
    dbias_ptr,      # out: (K,) fp32, or unused
    K,              # channels
    s_row, s_col,   # stats strides
    sgs, sgb, sw,   # grad_scale / grad_shift / weight strides
    count,          # n (float)
    eps,            # BN epsilon
    need_stats, need_weight, need_bias,   # runtime flags: which outputs to write
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    mean = tl.load(stats_ptr + offs * s_col, mask=mask, other=0.0).to(tl.float32)
    m2 = tl.load(stats_ptr + s_row + offs * s_col, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + offs * sw, mask=mask, other=0.0).to(tl.float32)
    g_scale = tl.load(gscale_ptr + offs * sgs, mask=mask, other=0.0).to(tl.float32)
    g_shift = tl.load(gshift_ptr + offs * sgb, mask=mask, other=0.0).to(tl.float32)
    d_weight, d_bias, d_mean, d_m2 = bn_finalize_grads(g_scale, g_shift, mean, m2, w, count, eps)
    if need_stats != 0:
        tl.store(dstats_ptr + offs, d_mean, mask=mask)
        tl.store(dstats_ptr + K + offs, d_m2, mask=mask)
    if need_weight != 0:
        tl.store(dweight_ptr + offs, d_weight.to(dweight_ptr.dtype.element_ty), mask=mask)
    if need_bias != 0:
        tl.store(dbias_ptr + offs, d_bias, mask=mask)


def _check_stats(stats: Tensor) -> int:
    if stats.dim() != 2 or stats.shape[0] != 2:
        raise ValueError(f"stats must have shape (2, K), got {tuple(stats.shape)}")
    if stats.dtype != torch.float32:
        raise TypeError(f"triton backend: stats must be float32, got {stats.dtype}")
    return stats.shape[1]


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"count must be >= 1 (values per channel), got count={count}")


def _check_nbt(num_batches_tracked: Optional[Tensor], device: torch.device) -> None:
    if num_batches_tracked is None:
        return
    if num_batches_tracked.numel() != 1 or num_batches_tracked.is_floating_point():
        raise ValueError("num_batches_tracked must be a one-element integer tensor, got "
                         f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
    check_same_device(device, num_batches_tracked=num_batches_tracked)


def check_train_args(K: int, device: torch.device, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     num_batches_tracked: Optional[Tensor], prefix: str = "") -> None:
    """bn_train_finalize's tensor arguments for K channels on `device` (ValueError/TypeError naming them; `prefix`
    before weight and bias: conv_bn_train's bn_weight, bn_bias)."""
    check_vector(prefix + "weight", weight, K)
    check_vector(prefix + "bias", bias, K)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    check_vector("running_mean", running_mean, K)
    check_vector("running_var", running_var, K)
    check_same_device(device, **{prefix + "weight": weight, prefix + "bias": bias}, running_mean=running_mean,
                      running_var=running_var)
    _check_nbt(num_batches_tracked, device)


def check_train_count(count: int, running: bool, num_batches_tracked: Optional[Tensor]) -> None:
    """As the reference (and BatchNorm2d): a running update from count < 2 values raises ValueError, after
    num_batches_tracked (when given) was bumped (one launch, then)."""
    if running and count < 2:
        if num_batches_tracked is not None:  # the reference bumps it before it raises
            no_stats = dummy(num_batches_tracked.device).view(2, -1)  # read, nothing written: only the bump
            _finalize(no_stats, count, None, None, 0.0, None, None, num_batches_tracked, 0.0, False)
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")


def _finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
              momentum: Optional[float], affine: bool) -> Optional[tuple[Tensor, Tensor]]:
    """The one launch of every finalize entry point (arguments checked by the caller)."""
    K = stats.shape[1]
    device = stats.device
    unused = dummy(device)
    running = running_mean is not None and running_var is not None
    scale = shift = None
    if affine:
        scale = torch.empty(K, dtype=torch.float32, device=device)
        shift = torch.empty(K, dtype=torch.float32, device=device)
        weight = identity_vector(1.0, K, device) if weight is None else weight
        bias = identity_vector(0.0, K, device) if bias is None else bias
    has_nbt = num_batches_tracked is not None
    _bn_finalize_kernel[(1,)](
        stats, weight if affine else unused, bias if affine else unused, scale if affine else unused,
        shift if affine else unused, running_mean if running else unused, running_var if running else unused,
        num_batches_tracked if has_nbt else unused,
        K, stats.stride(0), stats.stride(1), weight.stride(0) if affine else 1, bias.stride(0) if affine else 1,
        running_mean.stride(0) if running else 1, running_var.stride(0) if running else 1,
        float(count), float(eps), 0.0 if momentum is None else float(momentum),
        int(affine), int(running), int(has_nbt), int(momentum is None and has_nbt), BLOCK=_BLOCK, num_warps=4)
    return (scale, shift) if affine else None


def bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """Triton implementation of pe_kernels.reference.bn_finalize: returns (scale, shift), (K,) fp32. One launch."""
    K = _check_stats(stats)
    _check_count(count)
    check_vector("weight", weight, K)
    check_vector("bias", bias, K)
    check_same_device(stats.device, weight=weight, bias=bias)
    return _finalize(stats, count, weight, bias, eps, None, None, None, 0.0, True)


def bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                      momentum: float) -> None:
    """Triton implementation of pe_kernels.reference.bn_running_update (in place, BatchNorm2d semantics)."""
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
    K = _check_stats(stats)
    check_vector("running_mean", running_mean, K)
    check_vector("running_var", running_var, K)
    check_same_device(stats.device, running_mean=running_mean, running_var=running_var)
    _finalize(stats, count, None, None, 0.0, running_mean, running_var, None, momentum, False)


def bn_train_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> tuple[Tensor, Tensor]:
    """Triton implementation of pe_kernels.reference.bn_train_finalize: num_batches_tracked += 1 (when given), the
    running update with f = momentum or 1/num_batches_tracked read on the device (no host sync), and bn_finalize's
    (scale, shift). One launch, nothing else on the device. As the reference (and BatchNorm2d), count < 2 with
    running statistics raises ValueError after num_batches_tracked was bumped."""
    K = _check_stats(stats)
    _check_count(count)
    check_train_args(K, stats.device, weight, bias, running_mean, running_var, num_batches_tracked)
    check_train_count(count, running_mean is not None, num_batches_tracked)
    return _finalize(stats, count, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum,
                     True)


def bn_finalize_backward(grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], stats: Tensor, count: int,
                         weight: Optional[Tensor], eps: float, needs_grad: Sequence[bool]) -> list[Optional[Tensor]]:
    """Triton implementation of pe_kernels.reference.bn_finalize_backward: [d_stats (2, K) fp32, d_weight
    (weight's dtype), d_bias (fp32)] (FINALIZE_GRAD_NAMES), None where not needed (d_weight also where weight is
    None). One launch; every output is a fresh tensor of its own."""
    K = _check_stats(stats)
    _check_count(count)
    check_vector("grad_scale", grad_scale, K)
    check_vector("grad_shift", grad_shift, K)
    check_vector("weight", weight, K)
    check_same_device(stats.device, grad_scale=grad_scale, grad_shift=grad_shift, weight=weight)
    needs_grad = [bool(v) for v in needs_grad]
    if len(needs_grad) != 3:
        raise ValueError(f"needs_grad must have 3 entries (FINALIZE_GRAD_NAMES), got {len(needs_grad)}")
    need_stats, need_weight, need_bias = needs_grad
    need_weight = need_weight and weight is not None
    device = stats.device
    d_stats = torch.empty((2, K), dtype=torch.float32, device=device) if need_stats else None
    d_weight = torch.empty(K, dtype=weight.dtype, device=device) if need_weight else None
    d_bias = torch.empty(K, dtype=torch.float32, device=device) if need_bias else None
    if not (need_stats or need_weight or need_bias) or K == 0:
        return [d_stats, d_weight, d_bias]
    unused = dummy(device)
    zeros = identity_vector(0.0, K, device)
    grad_scale = zeros if grad_scale is None else grad_scale
    grad_shift = zeros if grad_shift is None else grad_shift
    weight = identity_vector(1.0, K, device) if weight is None else weight
    _bn_finalize_bwd_kernel[(cdiv(K, _BLOCK),)](
        grad_scale, grad_shift, stats, weight, unused if d_stats is None else d_stats,
        unused if d_weight is None else d_weight, unused if d_bias is None else d_bias,
        K, stats.stride(0), stats.stride(1), grad_scale.stride(0), grad_shift.stride(0), weight.stride(0),
        float(count), float(eps), int(need_stats), int(need_weight), int(need_bias), BLOCK=_BLOCK, num_warps=4)
    return [d_stats, d_weight, d_bias]
