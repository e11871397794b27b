"""BatchNorm finalize: batch statistics -> affine map, and the running-statistics update of BatchNorm2d.

Math (pe_kernels.reference.bn_finalize / bn_running_update), stats = [mean, m2] per channel (m2 = the sum of
squared deviations), n = count::

    mean = stats[0],  var = stats[1] / n,  invstd = 1 / sqrt(var + eps)     (no clamp: a NaN m2 stays NaN)
    scale = weight * invstd,  shift = bias - mean * scale          (weight = 1, bias = 0 when absent)
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * m2 / (n - 1)          (unbiased)

One small kernel does either or both (runtime flags, so one compiled kernel serves both); fp32 math, running
buffers updated in place in their own dtype and strides.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import Tensor, affine_pair, check_same_device, check_vector, dummy


@triton.jit(do_not_specialize=["K", "s_row", "affine", "running"])
def _bn_finalize_kernel(
    stats_ptr,      # (2, K) fp32 [mean, m2]
    weight_ptr,     # (K,) BN weight (gamma; ones when absent) or unused
    bias_ptr,       # (K,) BN bias (beta; zeros when absent) or unused
    scale_ptr,      # out: (K,) fp32 contiguous, or unused
    shift_ptr,      # out: (K,) fp32 contiguous, or unused
    rmean_ptr,      # in/out: running_mean (K,) or unused
    rvar_ptr,       # in/out: running_var (K,) or unused
    K,              # channels
    s_row, s_col,   # stats strides
    sw, sb,         # weight / bias strides (1 when unused)
    srm, srv,       # running_mean / running_var strides (1 when unused)
    count,          # n, the number of values per channel (float)
    eps,            # BN epsilon
    momentum,       # running-statistics momentum
    affine,         # 1: write scale, shift (a runtime flag: one compiled kernel serves both uses)
    running,        # 1: update running_mean, running_var
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    mean = tl.load(stats_ptr + offs * s_col, mask=mask, other=0.0).to(tl.float32)
    m2 = tl.load(stats_ptr + s_row + offs * s_col, mask=mask, other=0.0).to(tl.float32)
    if affine != 0:
        var = m2 / count
        scale = tl.load(weight_ptr + offs * sw, mask=mask, other=0.0).to(tl.float32) / tl.sqrt_rn(var + eps)
        shift = tl.load(bias_ptr + offs * sb, mask=mask, other=0.0).to(tl.float32) - mean * scale
        tl.store(scale_ptr + offs, scale, mask=mask)
        tl.store(shift_ptr + offs, shift, mask=mask)
    if running != 0:
        rm = tl.load(rmean_ptr + offs * srm, mask=mask, other=0.0)
        rv = tl.load(rvar_ptr + offs * srv, mask=mask, other=0.0)
        rm = rm.to(tl.float32) * (1.0 - momentum) + momentum * mean
        rv = rv.to(tl.float32) * (1.0 - momentum) + momentum * (m2 / (count - 1.0))
        tl.store(rmean_ptr + offs * srm, rm.to(rmean_ptr.dtype.element_ty), mask=mask)
        tl.store(rvar_ptr + offs * srv, rv.to(rvar_ptr.dtype.element_ty), mask=mask)


def _check_stats(stats: Tensor) -> int:
    if stats.dim() != 2 or stats.shape[0] != 2:
        raise ValueError(f"stats must have shape (2, K), got {tuple(stats.shape)}")
    if stats.dtype != torch.float32:
        raise TypeError(f"triton backend: stats must be float32, got {stats.dtype}")
    return stats.shape[1]


def _block(K: int) -> int:
    """One block size for every K (a grid over K): one compiled kernel whatever the layer width."""
    return 512


def bn_finalize(stats: Tensor, count: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """Triton implementation of pe_kernels.reference.bn_finalize: returns (scale, shift), (K,) fp32."""
    K = _check_stats(stats)
    if count < 1:
        raise ValueError(f"count must be >= 1 (values per channel), got count={count}")
    check_vector("weight", weight, K)
    check_vector("bias", bias, K)
    check_same_device(stats.device, weight=weight, bias=bias)
    scale = torch.empty(K, dtype=torch.float32, device=stats.device)
    shift = torch.empty(K, dtype=torch.float32, device=stats.device)
    if weight is None or bias is None:  # BatchNorm2d(affine=False): identity weight / bias
        weight, bias = affine_pair(weight, bias, K, stats)
    unused = dummy(stats.device)
    block = _block(K)
    _bn_finalize_kernel[(triton.cdiv(K, block),)](
        stats, weight, bias, scale, shift, unused, unused,
        K, stats.stride(0), stats.stride(1), weight.stride(0), bias.stride(0), 1, 1, float(count),
        float(eps), 0.0, 1, 0, BLOCK=block)
    return scale, shift


def bn_running_update(stats: Tensor, count: int, running_mean: Tensor, running_var: Tensor,
                      momentum: float) -> None:
    """Triton implementation of pe_kernels.reference.bn_running_update (in place, BatchNorm2d semantics)."""
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got count={count}")
    K = _check_stats(stats)
    check_vector("running_mean", running_mean, K)
    check_vector("running_var", running_var, K)
    check_same_device(stats.device, running_mean=running_mean, running_var=running_var)
    unused = dummy(stats.device)
    block = _block(K)
    _bn_finalize_kernel[(triton.cdiv(K, block),)](
        stats, unused, unused, unused, unused, running_mean, running_var,
        K, stats.stride(0), stats.stride(1), 1, 1, running_mean.stride(0), running_var.stride(0),
        float(count), 0.0, float(momentum), 0, 1, BLOCK=block)
